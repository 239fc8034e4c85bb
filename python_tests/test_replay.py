"""Seed-log replay: the logged passes rebuild the trained weights bit-exactly, on another backend, after resume,
and from a log written on a GPU (bench/results/gpu_seedlog/, made by bench/gpu_seedlog.py)."""
from __future__ import annotations

import copy
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mazo_kernels as mk

BACKEND = "cpu" if mk.has_cpu() else "reference"
ROOT = Path(__file__).resolve().parents[1]
GPU_RESULTS = ROOT / "bench" / "results" / "gpu_seedlog"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Mixed(nn.Module):
    """bf16, fp16 and fp32 weights in one model: one launch group per dtype, param groups across them."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter((torch.randn(8, 16, generator=g) * 0.05).to(torch.bfloat16))
        self.v = nn.Parameter((torch.randn(16, generator=g) * 0.02).to(torch.float16))
        self.b = nn.Parameter(torch.randn(8, generator=g) * 0.3)
        self.register_buffer("x", torch.randn(32, 16, generator=g))
        self.register_buffer("y", torch.randn(32, 8, generator=g))

    def forward(self):
        h = (self.x * (1 + self.v.float())) @ self.w.float().t() + self.b
        return ((h - self.y) ** 2).mean()


def _bits(t):
    return t.detach().contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bit_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        assert torch.equal(_bits(a[n]), _bits(b[n])), f"{n}: {int((_bits(a[n]) != _bits(b[n])).sum())} elements differ"


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_mixed(backend, steps=5, mode="inplace", nan_at=(), raise_at=(), **kw):
    model = Mixed()
    init = _snapshot(model)
    sel = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    masks = {"w": mk.ThresholdMask(0.06), "v": mk.BitMask.from_bool(sel)}
    groups = [{"params": [("w", model.w), ("v", model.v)], "weight_decay": 0.05},
              {"params": [("b", model.b)], "eps": 3e-3, "lr": 5e-3}]
    opt = mk.ZOSGD(groups, lr=2e-3, eps=1e-3, masks=masks, mode=mode, module=model, backend=backend, seed=99, **kw)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] in raise_at:
            raise KeyError("injected")
        return model() * (float("inf") if calls[0] in nan_at else 1.0)

    for _ in range(steps):
        try:
            opt.step(closure)
        except KeyError:
            pass
    return model, init, opt, {"v": mk.BitMask.from_bool(sel)}


@pytest.mark.parametrize("run_backend,replay_backend", [("reference", BACKEND), (BACKEND, "reference")])
@pytest.mark.parametrize("opts", [
    dict(num_perturbations=2),
    dict(estimator="one_sided", dist="rademacher", sign=True),
    dict(dist="gaussian_fast"),
    dict(mode="transient"),
    dict(mode="transient", estimator="one_sided", num_perturbations=2),
    dict(estimator="one_sided", num_perturbations=3, rounding="nearest"),
])
def test_replay_is_bit_exact_across_backends(run_backend, replay_backend, opts):
    model, init, opt, masks = _train_mixed(run_backend, **opts)
    final = _snapshot(model)
    assert any(not torch.equal(final[n], init[n]) for n in final)
    n = mk.replay(init, opt.state_dict()["seed_log"], backend=replay_backend, masks=masks)
    assert n == 5
    _assert_bit_equal(init, final)


def test_replay_of_skipped_and_failed_steps():
    # steps: 0 ok, 1 non-finite (second forward), 2 exception in its first forward, 3 and 4 ok
    model, init, opt, masks = _train_mixed(BACKEND, nan_at=(4,), raise_at=(5,))
    steps = opt.seed_log.steps
    assert [r["skipped"] for r in steps] == [False, True, True, False, False]
    assert steps[2]["error"].startswith("KeyError")
    final = _snapshot(model)
    mk.replay(init, opt.seed_log, backend="reference", masks=masks)
    _assert_bit_equal(init, final)


def test_inplace_replay_needs_all_three_passes():
    """In bf16 the in-place restore loses bits where a perturbed value lands in a coarser binade, so replaying only
    the update (the transient-equivalent math) does not give the run's weights; replay runs all three passes."""
    model, init, opt, masks = _train_mixed(BACKEND)
    final = _snapshot(model)
    log = opt.seed_log.to_dict()
    shortcut = copy.deepcopy(log)
    for r in shortcut["steps"]:
        r["mode"] = "transient"
    w_short = {n: t.clone() for n, t in init.items()}
    mk.replay(w_short, shortcut, backend=BACKEND, masks=masks)
    assert not torch.equal(_bits(w_short["w"]), _bits(final["w"]))
    mk.replay(init, log, backend=BACKEND, masks=masks)
    _assert_bit_equal(init, final)


def _tiny_llama(seed=0, dropout=0.0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_dropout=dropout)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_resume_mid_run_is_bit_exact():
    """state_dict -> new optimizer -> load_state_dict continues exactly as an uninterrupted run (train-mode
    dropout, an LR scheduler and param groups included)."""
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    def make(model):
        groups = [{"params": [(n, p) for n, p in model.named_parameters() if p.dim() == 2], "weight_decay": 0.01},
                  {"params": [(n, p) for n, p in model.named_parameters() if p.dim() == 1], "eps": 5e-4}]
        opt = mk.ZOSGD(groups, lr=1e-3, eps=1e-3, module=model, forward_mode="train", seed=5, backend=BACKEND)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def train(model, opt, sched, steps):
        model.train()
        for _ in range(steps):
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
            sched.step()

    a = _tiny_llama(dropout=0.3)
    opt, sched = make(a)
    train(a, opt, sched, 6)

    b = _tiny_llama(dropout=0.3)
    opt_b, sched_b = make(b)
    train(b, opt_b, sched_b, 3)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)           # the seed log is plain Python data
    c = _tiny_llama(seed=1, dropout=0.3)
    c.load_state_dict(ckpt["model"])
    opt_c, sched_c = make(c)
    sched_c.load_state_dict(ckpt["sched"])
    opt_c.load_state_dict(ckpt["opt"])
    train(c, opt_c, sched_c, 3)

    _assert_bit_equal(_snapshot(a), _snapshot(c))
    sa, sc = opt.seed_log.steps, opt_c.seed_log.steps
    assert [r["g_bits"] for r in sa] == [r["g_bits"] for r in sc]
    assert [r["lr"] for r in sa] == [r["lr"] for r in sc]
    assert len({r["lr"][0] for r in sa}) == 3            # the scheduler did change the steps


def test_spec_version_mismatch_is_refused():
    model, init, opt, masks = _train_mixed(BACKEND, steps=2)
    log = opt.seed_log.to_dict()
    bad = copy.deepcopy(log)
    bad["spec_version"] = mk.SPEC_VERSION + 1
    before = {n: t.clone() for n, t in init.items()}
    with pytest.raises(ValueError, match=f"spec version {mk.SPEC_VERSION + 1}.*implements spec version"):
        mk.replay(init, bad, masks=masks)
    bad = copy.deepcopy(log)
    bad["steps"][1]["spec_version"] = 0
    with pytest.raises(ValueError, match="spec version 0"):
        mk.replay(init, bad, masks=masks)
    _assert_bit_equal(init, before)
    sd = opt.state_dict()
    sd["seed_log"]["spec_version"] = mk.SPEC_VERSION + 1
    with pytest.raises(ValueError, match="spec version"):
        _train_mixed(BACKEND, steps=0)[2].load_state_dict(sd)


def test_version_1_log_replays_under_version_2():
    """Spec v2 only added gaussian_fast: a log written under v1 (Gaussian) replays bit for bit; a log that claims v1
    but uses gaussian_fast cannot be a real one and is refused, weights untouched."""
    model, init, opt, masks = _train_mixed(BACKEND, steps=3)
    final = _snapshot(model)
    log = copy.deepcopy(opt.seed_log.to_dict())
    log["spec_version"] = 1
    for r in log["steps"]:
        r["spec_version"] = 1
    assert mk.replay(init, log, masks=masks) == 3
    _assert_bit_equal(init, final)
    model, init, opt, masks = _train_mixed(BACKEND, steps=2, dist="gaussian_fast")
    before = {n: t.clone() for n, t in init.items()}
    log = copy.deepcopy(opt.seed_log.to_dict())
    log["steps"][0]["spec_version"] = 1
    with pytest.raises(ValueError, match="gaussian_fast.*spec version 2"):
        mk.replay(init, log, masks=masks)
    _assert_bit_equal(init, before)


def test_replay_bad_inputs_leave_weights_untouched():
    model, init, opt, masks = _train_mixed(BACKEND, steps=2)
    log = opt.seed_log.to_dict()
    before = {n: t.clone() for n, t in init.items()}
    with pytest.raises(ValueError, match="'v' was trained with a BitMask"):
        mk.replay(init, log)
    with pytest.raises(ValueError, match="'b'.*not among the given tensors"):
        mk.replay({"w": init["w"], "v": init["v"]}, log, masks=masks)
    with pytest.raises(ValueError, match="the log has float32"):
        mk.replay({**init, "b": init["b"].double()}, log, masks=masks)
    broken = copy.deepcopy(log)
    broken["steps"][1]["g_bits"] = []
    with pytest.raises(ValueError, match="step 1"):
        mk.replay(init, broken, masks=masks)
    with pytest.raises(ValueError, match="not a mazo_kernels seed log"):
        mk.replay(init, {"steps": []})
    _assert_bit_equal(init, before)


def test_json_round_trip_and_replay_from_path(tmp_path):
    model, init, opt, masks = _train_mixed(BACKEND, steps=3)
    path = tmp_path / "log.json"
    opt.seed_log.to_json(path)
    data = json.loads(path.read_text())
    assert data["spec_version"] == mk.SPEC_VERSION and len(data["steps"]) == 3
    r = data["steps"][0]
    for key in ("step", "seeds", "g_bits", "lr", "eps", "weight_decay", "dist", "estimator", "rounding", "sr_seed",
                "spec_version", "skipped"):
        assert key in r, key
    assert mk.SeedLog.from_json(path).to_dict() == opt.seed_log.to_dict()
    assert mk.replay(init, path, masks=masks) == 3
    _assert_bit_equal(init, _snapshot(model))


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_seedlog", ROOT / "bench" / "gpu_seedlog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_seed_log_replays_on_cpu(tmp_path):
    """With bench/results/gpu_seedlog/ present (a GPU run of bench/gpu_seedlog.py), replay its logs on the CPU and
    compare with the GPU's final weights bit for bit. Without it, make the same logs here with the reference
    backend and replay them with the C++ CPU backend."""
    if GPU_RESULTS.is_dir():
        root, steps = GPU_RESULTS, None
        meta = json.loads((root / "meta.json").read_text())
        assert meta["device"].startswith("cuda")
    else:
        root, steps = tmp_path, 3
        _bench_module().main(["--out", str(root), "--steps", str(steps), "--device", "cpu",
                              "--backend", "reference"])
    runs = sorted(p for p in root.iterdir() if (p / "seed_log.json").is_file())
    assert len(runs) >= 3
    for d in runs:
        init = torch.load(d / "initial.pt", weights_only=True)
        final = torch.load(d / "final.pt", weights_only=True)
        assert any(not torch.equal(init[n], final[n]) for n in init), d.name
        n = mk.replay(init, d / "seed_log.json", backend=BACKEND)
        assert n == (steps or n) and n > 0
        _assert_bit_equal(init, final)
