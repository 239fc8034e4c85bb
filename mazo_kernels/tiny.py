"""A tiny random-init LLaMA and a character-level tokenizer, built locally (nothing is downloaded).

For tests, the CLI's ``--config tiny`` and experiments on machines without model weights. The tokenizer is a
``transformers.PreTrainedTokenizerFast`` over a byte-free character vocabulary (printable ASCII plus newline and
tab; any other character maps to <unk>), so it saves and loads with ``save_pretrained`` / ``AutoTokenizer`` like
any other.
"""
from __future__ import annotations

import string

import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")


def char_tokenizer(chars: str = CHARS):
    """A character-level PreTrainedTokenizerFast: BOS prepended, pad/eos/unk set, padding on the right."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    # A BPE model without merges and without a pre-tokenizer splits text into single characters, spaces included.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right")


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, intermediate_size: int = 128, max_position_embeddings: int = 512,
                      **kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
                       intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kwargs)


def tiny_llama(*, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None, **config_kwargs):
    """(model, tokenizer): a random-init LlamaForCausalLM sized to the tokenizer (char_tokenizer() by default)."""
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer or char_tokenizer()
    config = tiny_llama_config(len(tokenizer), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer
