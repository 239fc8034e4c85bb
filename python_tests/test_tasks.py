"""Task files, the multi-task sampler, the answer-only loss and choice scoring (mazo_kernels.tasks)."""
import json
import os
from collections import Counter

import pytest
import torch

from mazo_kernels import tasks as T
from mazo_kernels.tiny import char_tokenizer, tiny_llama

DATA = os.path.join(os.path.dirname(__file__), "data")
SENTIMENT = os.path.join(DATA, "task_sentiment.jsonl")
ECHO = os.path.join(DATA, "task_echo.jsonl")


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama(seed=3)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Absolute position embeddings: left padding is right only with position_ids that skip the padding (RoPE
    models are shift-invariant and would not notice)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return model.eval(), tok


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines))
    return str(p)


# ---------------------------------------------------------------------------------------------------- files
def test_load_example_files():
    tasks = T.load_tasks([SENTIMENT, ECHO])
    assert list(tasks) == ["task_sentiment", "echo"]          # file stem by default, the "task" field otherwise
    s, e = tasks["task_sentiment"], tasks["echo"]
    raw = [json.loads(l) for l in open(SENTIMENT)]
    assert len(s) == len(raw) and len(e) == len(open(ECHO).readlines())
    assert all(x.is_choice for x in s) and not any(x.is_choice for x in e)
    assert [x.label for x in s] == [r["label"] for r in raw]
    assert s[0].target == raw[0]["choices"][raw[0]["label"]]
    assert e[0].target == json.loads(open(ECHO).readline())["completion"]


def test_task_field_splits_one_file(tmp_path):
    p = _write(tmp_path, ['{"prompt": "a", "completion": "b", "task": "x"}', '',
                          '{"prompt": "c", "choices": ["d", "e"], "label": 1}'], name="mixed.jsonl")
    tasks = T.load_tasks([p])
    assert {k: len(v) for k, v in tasks.items()} == {"x": 1, "mixed": 1}


BAD = [
    (['{"prompt": "a", "completion": "b"}', '{"choices": ["x", "y"], "label": 0}'], 2, "missing field 'prompt'"),
    (['{"prompt": "a"}'], 1, "missing field 'choices'"),
    (['{"prompt": "a", "choices": ["x", "y"]}'], 1, "missing field 'label'"),
    (['{"prompt": "a", "choices": ["x", "y"], "label": 2}'], 1, "label 2 out of range for 2 choices"),
    (['{"prompt": "a", "choices": ["x", "y"], "label": -1}'], 1, "label -1 out of range"),
    (['{"prompt": "a", "choices": ["x", "y"], "label": true}'], 1, "'label' must be an integer"),
    (['{"prompt": "a", "choices": ["x"], "label": 0}'], 1, "at least 2 non-empty strings"),
    (['{"prompt": "a", "choices": ["x", "y"], "label": 0, "completion": "z"}'], 1, "both 'choices' and 'completion'"),
    (['{"prompt": 3, "completion": "b"}'], 1, "'prompt' must be a string"),
    (['{"prompt": "a", "completion": ""}'], 1, "'completion' must be a non-empty string"),
    (['{"prompt": "a", "completion": "b"}', '', '{"prompt": "a", "completion": "b"'], 3, "invalid JSON"),
    (['["prompt", "a"]'], 1, "expected a JSON object"),
    ([], 1, "empty task file"),
    (['', '   '], 1, "empty task file"),
]


@pytest.mark.parametrize("lines,lineno,msg", BAD)
def test_bad_files_name_file_and_line(tmp_path, lines, lineno, msg):
    p = _write(tmp_path, lines)
    with pytest.raises(T.TaskFormatError) as ei:
        T.load_task_file(p)
    assert f"{p}:{lineno}:" in str(ei.value)
    assert msg in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(T.TaskFormatError, match="cannot read task file"):
        T.load_task_file(tmp_path / "nope.jsonl")


def test_split_tasks_holds_out_disjoint_examples():
    tasks = T.load_tasks([SENTIMENT, ECHO])
    train, held = T.split_tasks(tasks, 8, seed=1)
    for k in tasks:
        assert len(held[k]) == 8 and len(train[k]) == len(tasks[k]) - 8
        assert Counter(train[k]) + Counter(held[k]) == Counter(tasks[k])
    assert T.split_tasks(tasks, 8, seed=1) == (train, held)
    with pytest.raises(ValueError, match="too few"):
        T.split_tasks({"one": tasks["echo"][:1]}, 4)


# ---------------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("mixing", ["uniform", "proportional"])
def test_sampler_mixing_proportions(mixing):
    tasks = {"a": [("a", i) for i in range(10)], "b": [("b", i) for i in range(30)], "c": [("c", i) for i in range(60)]}
    s = T.MultiTaskSampler(tasks, 16, mixing=mixing, seed=5)
    draws = [x for _ in range(500) for x in s.next_batch()]
    frac = {k: v / len(draws) for k, v in Counter(t for t, _ in draws).items()}
    want = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3} if mixing == "uniform" else {"a": 0.1, "b": 0.3, "c": 0.6}
    for k in want:       # 8000 draws: the standard error of each fraction is below 0.0055
        assert abs(frac[k] - want[k]) < 0.025, (k, frac, want)


def test_sampler_is_deterministic_and_walks_each_task():
    tasks = {"a": list(range(7)), "b": list(range(100, 113))}
    one = [T.MultiTaskSampler(tasks, 4, seed=11).next_batch() for _ in range(1)]
    s1, s2, s3 = (T.MultiTaskSampler(tasks, 4, seed=sd) for sd in (11, 11, 12))
    b1 = [s1.next_batch() for _ in range(50)]
    assert b1 == [s2.next_batch() for _ in range(50)]
    assert b1[:1] == one
    assert b1 != [s3.next_batch() for _ in range(50)]
    flat_a = [x for b in b1 for x in b if x < 100]
    # each pass over a task is a permutation of it: no example repeats before all were seen
    for i in range(0, len(flat_a) - 6, 7):
        assert sorted(flat_a[i:i + 7]) == list(range(7))


def test_sampler_errors():
    with pytest.raises(ValueError, match="mixing must be one of"):
        T.MultiTaskSampler({"a": [1]}, 2, mixing="weird")
    with pytest.raises(ValueError, match="batch_size"):
        T.MultiTaskSampler({"a": [1]}, 0)
    with pytest.raises(ValueError, match="task 'b' has no examples"):
        T.MultiTaskSampler({"a": [1], "b": []}, 2)


# ---------------------------------------------------------------------------------------------------- loss
def _examples():
    tasks = T.load_tasks([SENTIMENT, ECHO])
    return tasks["task_sentiment"][:3] + tasks["echo"][:3]


def test_pad_token_defaults_to_eos():
    tok = char_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    T.prepare_tokenizer(tok)
    assert tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_are_exactly_the_answer_tokens(tiny, side):
    _, tok = tiny
    exs = _examples()
    b = T.training_batch(tok, exs, padding_side=side)
    for i, e in enumerate(exs):
        p = tok(e.prompt)["input_ids"]
        a = tok(e.target, add_special_tokens=False)["input_ids"] + ([] if e.is_choice else [tok.eos_token_id])
        real = b["attention_mask"][i].bool()
        assert b["input_ids"][i][real].tolist() == p + a
        lab = b["labels"][i]
        assert lab[lab != T.IGNORE_INDEX].tolist() == a
        assert (lab[real][:len(p)] == T.IGNORE_INDEX).all() and (lab[~real] == T.IGNORE_INDEX).all()
        assert b["position_ids"][i][real].tolist() == list(range(len(p) + len(a)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_equals_manual_cross_entropy(tiny, side):
    model, tok = tiny
    exs = _examples()
    with torch.no_grad():
        got = T.batch_loss(model, T.training_batch(tok, exs, padding_side=side))
        nll, n = 0.0, 0
        for e in exs:           # one unpadded sequence at a time
            p = tok(e.prompt)["input_ids"]
            a = tok(e.target, add_special_tokens=False)["input_ids"] + ([] if e.is_choice else [tok.eos_token_id])
            logits = model(torch.tensor([p + a])).logits[0].double()
            for j, t in enumerate(a):
                nll -= torch.log_softmax(logits[len(p) + j - 1], -1)[t].item()
                n += 1
        # the Hugging Face loss on the same labels agrees too
        b = T.training_batch(tok, exs, padding_side=side)
        hf = model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}).loss
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - nll / n) < 1e-5
    assert abs(got.item() - hf.item()) < 1e-5


def test_truncation_keeps_answer(tiny):
    _, tok = tiny
    ids, n = T.encode(tok, "x" * 50, " yes", max_length=10)
    assert len(ids) == 10 and n == 4 and tok.decode(ids[-4:]) == " yes"
    with pytest.raises(ValueError, match="does not fit"):
        T.encode(tok, "p", " yes", max_length=4)


# ---------------------------------------------------------------------------------------------------- scoring
def _naive_scores(model, tok, e, reduction):
    out = []
    with torch.no_grad():
        for c in e.choices:
            p = tok(e.prompt)["input_ids"]
            a = tok(c, add_special_tokens=False)["input_ids"]
            lp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), -1)
            s = sum(lp[len(p) + j - 1, t].item() for j, t in enumerate(a))
            out.append(s / len(a) if reduction == "mean" else s)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_choice_scores_equal_naive(tiny, tiny_gpt2, arch, side, reduction):
    model, tok = tiny if arch == "llama" else tiny_gpt2
    # choices of different lengths, so padding differs inside one batch
    exs = [T.Example("review: good fun. it was", "s", choices=(" bad", " good", " so-so!"), label=1),
           T.Example("2+2=", "m", choices=(" 4", " five", " 22"), label=0),
           T.Example("a much longer prompt than the others here:", "m", choices=(" x", " yz"), label=1)]
    got = T.score_choices(model, tok, exs, reduction=reduction, batch_size=5, padding_side=side)
    for e, g in zip(exs, got):
        torch.testing.assert_close(g.double(), _naive_scores(model, tok, e, reduction), atol=2e-5, rtol=0)


def test_evaluate_accuracy_and_loss_match_naive(tiny):
    model, tok = tiny
    exs = T.load_tasks([SENTIMENT])["task_sentiment"][:10]
    res = T.evaluate(model, tok, exs, batch_size=7)
    correct, nll, n = 0, 0.0, 0
    for e in exs:
        sc = _naive_scores(model, tok, e, "mean")
        correct += int(sc.argmax()) == e.label
        k = len(tok(e.choices[e.label], add_special_tokens=False)["input_ids"])
        nll -= _naive_scores(model, tok, e, "sum")[e.label].item()
        n += k
    assert res["n"] == 10
    assert res["accuracy"] == correct / 10
    assert abs(res["loss"] - nll / n) < 1e-5


def test_completion_exact_match_is_greedy_decoding(tiny):
    model, tok = tiny
    prompt = tok("echo abc ->")["input_ids"]
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(4):                      # greedy decoding, one token at a time
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(prompt):]
    wrong = greedy[:-1] + [(greedy[-1] + 1) % len(tok)]
    b = T.collate([(prompt + greedy, 4), (prompt + wrong, 4), ([1] + prompt, 4)], tok.pad_token_id)
    with torch.no_grad():
        _, counts, hits = T.sequence_scores(model, b)
    assert counts.tolist() == [4, 4, 4]
    assert hits[0].item() is True and hits[1].item() is False


def test_score_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="reduction must be one of"):
        T.score_choices(model, tok, _examples()[:1], reduction="max")
    with pytest.raises(ValueError, match="completion example"):
        T.score_choices(model, tok, _examples()[-1:])
    with pytest.raises(ValueError, match="no answer tokens"):
        T.lm_loss(torch.randn(1, 3, 5), torch.full((1, 3), T.IGNORE_INDEX))
