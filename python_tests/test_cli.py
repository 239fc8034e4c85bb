"""mazo-train end to end on a tiny random LLaMA and the two toy task files; argument errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import mazo_kernels as mk

import transformers  # noqa: E402

from mazo_kernels import cli  # noqa: E402
from mazo_kernels.tiny import tiny_llama  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
SENTIMENT = os.path.join(DATA, "task_sentiment.jsonl")
ECHO = os.path.join(DATA, "task_echo.jsonl")
BACKEND = "cpu" if mk.has_cpu() else "reference"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_outputs(out, steps, method, seed, dtype=torch.float32):
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    evals = metrics["evals"]
    assert [e["step"] for e in evals][0] == 0 and evals[-1]["step"] == steps
    for e in evals:
        assert set(e["tasks"]) == {"task_sentiment", "echo"}
        for r in e["tasks"].values():
            assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["n"] == 4
    assert len(metrics["train_loss"]) == steps
    assert metrics["steps_per_s"] > 0 and metrics["total_time_s"] > 0

    model_dir = os.path.join(out, "model")
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
    trained = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    assert next(trained.parameters()).dtype == dtype
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert tok("ab")["input_ids"] == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]

    log = json.load(open(os.path.join(out, "seed_log.json")))
    assert len(log["steps"]) == steps

    masks = None
    if method != "mezo":
        masks = mk.load_masks(os.path.join(out, "masks.safetensors"))
        assert masks and set(masks) <= {n for n, _ in trained.named_parameters()}
    # the strongest check of all four files together: replaying the seed log (with the saved masks) from the same
    # random init rebuilds the saved weights bit for bit
    init, _ = tiny_llama(seed=seed, dtype=dtype)
    mk.replay(init, os.path.join(out, "seed_log.json"), backend=BACKEND, masks=masks)
    init_params = dict(init.named_parameters())
    for n, p in trained.named_parameters():
        assert torch.equal(p, init_params[n]), n
    fresh, _ = tiny_llama(seed=seed, dtype=dtype)
    moved = sum(int(not torch.equal(p, dict(fresh.named_parameters())[n])) for n, p in trained.named_parameters())
    assert moved > 0
    return metrics


def test_cli_in_process_mazo(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli.main(["--config", "tiny", "--tasks", SENTIMENT, ECHO, "--method", "mazo", "--density", "0.25",
                   "--steps", "8", "--eval-every", "4", "--eval-examples", "4", "--batch-size", "4",
                   "--lr", "1e-3", "--backend", BACKEND, "--device", "cpu", "--seed", "3", "--mask-batches", "1",
                   "--output-dir", out, "--no-progress"])
    assert rc == 0
    assert "8 steps" in capsys.readouterr().out
    m = _check_outputs(out, 8, "mazo", 3)
    assert [e["step"] for e in m["evals"]] == [0, 4, 8]
    assert m["zo_args"]["density"] == 0.25 and m["args"]["mixing"] == "uniform"


def test_cli_lookahead_is_the_same_run(tmp_path, capsys):
    """--lookahead: the same training losses as without it; the saved model is settled, so the seed log replays to
    it (_check_outputs), with the settles at the evaluations recorded."""
    runs = {}
    for la in (False, True):
        out = str(tmp_path / f"run{la}")
        rc = cli.main(["--config", "tiny", "--tasks", SENTIMENT, ECHO, "--steps", "6", "--eval-every", "3",
                       "--eval-examples", "4", "--batch-size", "4", "--lr", "1e-3", "--backend", BACKEND,
                       "--device", "cpu", "--seed", "4", "--output-dir", out, "--no-progress"]
                      + (["--lookahead"] if la else []))
        assert rc == 0
        runs[la] = _check_outputs(out, 6, "mezo", 4)
        log = json.load(open(os.path.join(out, "seed_log.json")))
        assert [s.get("settled_seed") is not None for s in log["steps"]] == [False, False, la, False, False, la]
    assert runs[True]["train_loss"] == runs[False]["train_loss"]
    assert runs[True]["zo_args"]["lookahead"] is True


def test_cli_subprocess_sparse_mezo_bf16(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "mazo_kernels.cli", "--config", "tiny", "--tasks", SENTIMENT, ECHO,
           "--method", "sparse-mezo", "--sparsity", "0.5", "--dtype", "bf16", "--steps", "3", "--eval-examples", "4",
           "--batch-size", "2", "--mixing", "proportional", "--backend", BACKEND, "--device", "cpu",
           "--output-dir", out]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3/3" in p.stderr          # the tqdm progress bar
    m = _check_outputs(out, 3, "sparse-mezo", 0, dtype=torch.bfloat16)
    assert m["args"]["dtype"] == "bf16"


def test_cli_model_dir_and_eval_files(tmp_path):
    """--model loads a local directory (here: one written by save_pretrained); --eval-tasks are separate files."""
    model, tok = tiny_llama(seed=8)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = str(tmp_path / "run")
    rc = cli.main(["--model", src, "--tasks", SENTIMENT, "--eval-tasks", ECHO, "--eval-examples", "3",
                   "--steps", "2", "--batch-size", "2", "--backend", BACKEND, "--device", "cpu", "--output-dir", out,
                   "--no-progress"])
    assert rc == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m["evals"][-1]["tasks"]) == {"echo"} and m["evals"][-1]["tasks"]["echo"]["n"] == 3
    assert m["tasks"] == {"task_sentiment": 40}


BAD_ARGS = [
    (["--steps", "0"], "argument --steps: expected a positive integer"),
    (["--lr", "-1"], "argument --lr: expected a number in [0, inf)"),
    (["--eps", "0"], "argument --eps: expected a number in (0, inf)"),
    (["--lr", "abc"], "argument --lr: expected a number"),
    (["--density", "0.3"], "argument --density: applies to --method mazo"),
    (["--method", "sparse-mezo", "--sparsity", "1"], "argument --sparsity: expected a number in [0, 1)"),
    (["--method", "adam"], "argument --method: invalid choice"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--mixing", "random"], "argument --mixing: invalid choice"),
]


@pytest.mark.parametrize("extra,msg", BAD_ARGS)
def test_bad_arguments(tmp_path, capsys, extra, msg):
    argv = ["--config", "tiny", "--tasks", SENTIMENT, "--output-dir", str(tmp_path)] + extra
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", SENTIMENT, "--output-dir", "x"], "one of the arguments --model --config is required"),
    (["--config", "tiny", "--model", "m", "--tasks", SENTIMENT, "--output-dir", "x"], "not allowed with argument"),
    (["--config", "tiny", "--output-dir", "x"], "the following arguments are required: --tasks"),
    (["--model", "/nonexistent/model", "--tasks", SENTIMENT, "--output-dir", "x"], "argument --model: "),
    (["--config", "nope.json", "--tasks", SENTIMENT, "--output-dir", "x"], "argument --config: "),
    (["--config", "tiny", "--tasks", "missing.jsonl", "--output-dir", "x"], "'missing.jsonl' is not a file"),
])
def test_bad_argument_combinations(capsys, argv, msg):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert msg in capsys.readouterr().err


def test_bad_task_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "choices": ["x", "y"], "label": 5}\n')
    rc = cli.main(["--config", "tiny", "--tasks", str(bad), "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: label 5 out of range for 2 choices" in err and "Traceback" not in err


def test_cli_config_json_gpt2(tmp_path, capsys):
    """--config JSON: random init of any architecture (here GPT-2) with the character tokenizer."""
    from mazo_kernels.tiny import char_tokenizer
    cfg = transformers.GPT2Config(vocab_size=len(char_tokenizer()), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = str(tmp_path / "gpt2.json")
    cfg.to_json_file(path)
    out = str(tmp_path / "run")
    rc = cli.main(["--config", path, "--tasks", SENTIMENT, ECHO, "--eval-examples", "2", "--steps", "3",
                   "--batch-size", "2", "--backend", BACKEND, "--device", "cpu", "--output-dir", out,
                   "--no-progress"])
    assert rc == 0
    trained = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"), local_files_only=True)
    assert type(trained).__name__ == "GPT2LMHeadModel"
    assert len(json.load(open(os.path.join(out, "seed_log.json")))["steps"]) == 3

    small = transformers.GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=1)
    small.to_json_file(path)
    rc = cli.main(["--config", path, "--tasks", SENTIMENT, "--steps", "1", "--device", "cpu", "--output-dir", out,
                   "--no-progress"])
    assert rc == 2
    assert "vocab_size 10 is smaller than the tokenizer's 101 tokens" in capsys.readouterr().err
