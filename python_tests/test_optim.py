"""ZOSGD against a dense pure-torch MeZO reference built from the reference noise, plus its options and errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mazo_kernels as mk
from mazo_kernels import reference as ref

BACKEND = "cpu" if mk.has_cpu() else "reference"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread start-up and oversubscription on a shared 2-core machine cost more than the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Quad(nn.Module):
    """A small regression model: every parameter matters to the loss, and it is cheap to evaluate densely."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(12, 6)
        self.scale = nn.Parameter(torch.randn(6, generator=g) * 0.3 + 1.0)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(6, 12, generator=g) * 0.5)
            self.lin.bias.copy_(torch.randn(6, generator=g) * 0.2)
        self.register_buffer("x", torch.randn(40, 12, generator=g))
        self.register_buffer("y", torch.randn(40, 6, generator=g))
        self.to(dtype)

    def forward(self):
        out = self.lin(self.x) * self.scale
        return ((out.float() - self.y.float()) ** 2).mean()


def _named(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _z(seed, name, t, dist):
    return ref.noise(seed, mk.stable_tensor_id(name), torch.arange(t.numel()), mk.optim.DISTS[dist]).view(t.shape)


def dense_mezo(model, theta0, hp, seeds, *, estimator="two_sided", dist="gaussian", sign=False):
    """One MeZO step computed densely in float64 from the reference noise.

    hp: {name: (lr, eps, wd)}. Losses are evaluated at float32(theta + fl32(eps*z)) like the kernels' perturbed
    weights; g_i per tensor = (L+ - L-)/(2 eps) (or (L+ - L0)/eps), averaged over the q directions."""
    def loss_at(shift_sign, zs):
        params = {}
        for n, t in theta0.items():
            eps = torch.tensor(hp[n][1], dtype=torch.float32)
            params[n] = (t.float() + shift_sign * (eps * zs[n])).to(t.dtype)
        with torch.no_grad():
            return float(functional_call(model, params, ()))

    with torch.no_grad():
        l0 = float(functional_call(model, theta0, ()))
    acc = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in theta0.items()}
    for s in seeds:
        zs = {n: _z(s, n, t, dist) for n, t in theta0.items()}
        lp = loss_at(1.0, zs)
        lm = loss_at(-1.0, zs) if estimator == "two_sided" else l0
        for n in theta0:
            eps = hp[n][1]
            g = (lp - lm) / (2 * eps) if estimator == "two_sided" else (lp - lm) / eps
            if sign:
                g = math.copysign(1.0, g) if g != 0 else 0.0
            acc[n] += g * zs[n].double() / len(seeds)
    return {n: t.double() - hp[n][0] * (acc[n] + hp[n][2] * t.double()) for n, t in theta0.items()}


def _assert_update_close(model, theta0, expect, rtol=1e-4):
    for n, p in model.named_parameters():
        got = p.detach().double() - theta0[n].double()
        want = expect[n] - theta0[n].double()
        assert want.abs().max() > 1e-4, f"{n}: the reference update is too small to test anything"
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=n)


@pytest.mark.parametrize("estimator,dist,sign,q", [
    ("two_sided", "gaussian", False, 1),
    ("one_sided", "gaussian", False, 1),
    ("two_sided", "rademacher", False, 1),
    ("two_sided", "gaussian_fast", False, 1),
    ("two_sided", "gaussian", True, 1),
    ("two_sided", "gaussian", False, 3),
    ("one_sided", "rademacher", False, 2),
])
def test_step_matches_dense_reference_fp32(estimator, dist, sign, q):
    model = Quad()
    theta0 = _named(model)
    lr, eps, wd = 2e-3, 1e-3, 0.05
    opt = mk.ZOSGD(model.named_parameters(), lr=lr, eps=eps, weight_decay=wd, dist=dist, estimator=estimator,
                   sign=sign, num_perturbations=q, seed=1234, backend=BACKEND)
    calls = []

    def closure():
        calls.append(1)
        return model()

    loss = opt.step(closure)
    assert len(calls) == (2 * q if estimator == "two_sided" else q + 1)
    seeds, sr_seed, _ = mk.step_seeds(1234, 0, q)
    rec = opt.seed_log.steps[0]
    assert rec["seeds"] == seeds and rec["sr_seed"] == sr_seed and rec["skipped"] is False
    expect = dense_mezo(model, theta0, {n: (lr, eps, wd) for n in theta0}, seeds, estimator=estimator, dist=dist,
                        sign=sign)
    _assert_update_close(model, theta0, expect)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    if estimator == "one_sided":
        with torch.no_grad():
            assert float(loss) == float(functional_call(model, theta0, ()))


def test_param_groups_lr_eps_wd_share_one_launch():
    model = Quad()
    theta0 = _named(model)
    hp = {"lin.weight": (3e-3, 2e-3, 0.1), "lin.bias": (1e-2, 5e-4, 0.0), "scale": (1e-2, 5e-4, 0.0)}
    groups = [
        {"params": [("lin.weight", model.lin.weight)], "lr": 3e-3, "eps": 2e-3, "weight_decay": 0.1},
        {"params": [model.lin.bias, model.scale], "param_names": ["lin.bias", "scale"], "lr": 1e-2, "eps": 5e-4},
    ]
    opt = mk.ZOSGD(groups, lr=99.0, weight_decay=0.0, seed=7, backend=BACKEND)
    assert [g["param_names"] for g in opt.param_groups] == [["lin.weight"], ["lin.bias", "scale"]]
    assert len(opt.plan.groups) == 1                 # one dtype: one launch per pass for all three tensors
    opt.step(model)
    seeds, _, _ = mk.step_seeds(7, 0, 1)
    _assert_update_close(model, theta0, dense_mezo(model, theta0, hp, seeds))
    rec = opt.seed_log.steps[0]
    assert rec["lr"] == [3e-3, 1e-2] and rec["eps"] == [2e-3, 5e-4] and rec["weight_decay"] == [0.1, 0.0]
    assert rec["eps_ref"] == 2e-3


@pytest.mark.parametrize("sched", ["step", "lambda"])
def test_lr_scheduler_changes_the_step(sched):
    model = Quad()
    opt = mk.ZOSGD(model.named_parameters(), lr=4e-3, eps=1e-3, seed=3, backend=BACKEND)
    if sched == "step":
        s = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 3 * k))
    for k in range(3):
        lr = opt.param_groups[0]["lr"]
        theta0 = _named(model)
        opt.step(model)
        seeds, _, _ = mk.step_seeds(3, k, 1)
        _assert_update_close(model, theta0, dense_mezo(model, theta0, {n: (lr, 1e-3, 0.0) for n in theta0}, seeds))
        s.step()
    lrs = [r["lr"][0] for r in opt.seed_log.steps]
    assert lrs == pytest.approx([4e-3, 2e-3, 1e-3] if sched == "step" else [4e-3, 1e-3, 4e-3 / 7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_step_is_the_functional_api_loop(dtype):
    """A single-group step issues exactly the README's functional loop (perturb_, perturb_, update_ with stochastic
    rounding and the step's sr_seed): bit-identical weights."""
    model = Quad(dtype)
    twin = Quad(dtype)
    lr, eps, wd = 3e-2, 1e-2, 0.1
    opt = mk.ZOSGD(model.named_parameters(), lr=lr, eps=eps, weight_decay=wd, seed=5, backend=BACKEND)
    assert opt.rounding == "stochastic"
    for k in range(3):
        opt.step(model)
        (seed,), sr_seed, _ = mk.step_seeds(5, k, 1)
        plan = mk.ZOPlan([mk.PlanEntry(n, p.detach(), mk.stable_tensor_id(n), weight_decay=wd)
                          for n, p in twin.named_parameters()])
        mk.perturb_(plan, seed, eps, backend=BACKEND)
        mk.perturb_(plan, seed, -eps, prior=eps, backend=BACKEND)
        g = opt.seed_log.steps[k]["g"]
        mk.update_(plan, [seed], g, lr=lr, restore_seed=seed, prior=-eps, sr_seed=sr_seed, backend=BACKEND)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    assert any(not torch.equal(p.detach(), q) for (_, p), q in zip(model.named_parameters(), Quad(dtype).parameters()))


def _restore_exact(t, name, seed, eps):
    """Where the spec promises an exact fp32 in-place restore of w after the passes w + d and w - d: neither
    rounding lands in a coarser binade (ulp(v) <= ulp(w)) nor is a tie (then two weights map to one value and one
    bit is gone): docs/NOISE_SPEC.md, "Restore: when it is exact", conditions (a) and (b)."""
    w = t.float()
    d = torch.tensor(eps, dtype=torch.float32) * _z(seed, name, t, "gaussian")
    e = lambda x: torch.frexp(x)[1]  # noqa: E731
    ok = torch.ones_like(w, dtype=torch.bool)
    for x in (w.double() + d.double(), w.double() - d.double()):        # exact sums
        v = x.float()
        ulp = (torch.nextafter(v, torch.tensor(float("inf"))) - v).double().abs()
        tie = (x != v.double()) & ((x - v.double()).abs() * 2 == ulp)
        ok &= (e(v) <= e(w)) & ~tie
    return ok


def _lr0_twin(make, dtype, mode, **kw):
    """Weights after one step with lr = 0 (same seed, same options)."""
    model = make(dtype)
    opt = mk.ZOSGD(model.named_parameters(), lr=0.0, module=model, mode=mode, **kw)
    opt.step(model)
    return _named(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_nonfinite_loss_skips_the_update(dtype, mode):
    kw = dict(eps=1e-2, weight_decay=0.5, seed=11, backend=BACKEND)
    model = Quad(dtype)
    before = _named(model)
    opt = mk.ZOSGD(model.named_parameters(), lr=0.1, module=model, mode=mode, **kw)
    n = [0]

    def closure():
        n[0] += 1
        return model() * (float("nan") if n[0] == 2 else 1.0)

    opt.step(closure)
    twin = _lr0_twin(Quad, dtype, mode, **kw)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), twin[name]), name          # bit-identical to an lr = 0 step (wd not applied)
        if mode == "transient":
            assert torch.equal(p.detach(), before[name]), name
    assert opt.seed_log.steps[0]["skipped"] is True
    assert opt.seed_log.steps[0]["g"] == [None]
    opt.step(model)                                                  # the next step trains again
    assert opt.seed_log.steps[1]["skipped"] is False
    assert any(not torch.equal(p.detach(), twin[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["inplace", "transient"])
@pytest.mark.parametrize("fail_at,q", [(1, 1), (2, 1), (3, 2)])
def test_exception_in_closure_restores_weights(dtype, mode, fail_at, q):
    kw = dict(eps=1e-2, weight_decay=0.5, seed=13, num_perturbations=q, backend=BACKEND)
    model = Quad(dtype)
    before = _named(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    opt = mk.ZOSGD(model.named_parameters(), lr=0.1, module=model, mode=mode, **kw)
    n = [0]

    def closure():
        n[0] += 1
        if n[0] == fail_at:
            raise RuntimeError("boom")
        return model()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    twin = _lr0_twin(Quad, dtype, mode, **kw)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), twin[name]), name
        assert p.data_ptr() == ptrs[name]
        if mode == "transient":
            assert torch.equal(p.detach(), before[name]), name               # transient never writes
        elif dtype == torch.float32:
            # in place: exact wherever neither perturbed value lands in a coarser binade (docs/NOISE_SPEC.md)
            ok = torch.ones_like(before[name], dtype=torch.bool)
            for seed in mk.step_seeds(13, 0, q)[0]:
                ok &= _restore_exact(before[name], name, seed, 1e-2)
            assert ok.float().mean() >= 0.5
            assert torch.equal(p.detach()[ok], before[name][ok]), name
    rec = opt.seed_log.steps[0]
    assert rec["skipped"] is True and "boom" in rec["error"]


def _tiny_llama(dtype, tie=False, seed=0, vocab=64):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("method,dist", [("mezo", "gaussian"), ("mezo", "gaussian_fast"), ("sparse-mezo", "gaussian"),
                                         ("mazo", "gaussian")])
@pytest.mark.parametrize("dtype,lr", [(torch.float32, 1e-3), (torch.bfloat16, 1e-3)])
def test_loss_falls_on_tiny_llama(dtype, lr, method, dist):
    model = _tiny_llama(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, 64, (8, 16), generator=g)
    labels = torch.full_like(x, 7)             # learnable: always predict token 7

    def closure():
        return model(input_ids=x, labels=labels).loss

    masks = None
    if method == "sparse-mezo":
        masks = mk.sparse_mezo_masks(model, 0.5)
    elif method == "mazo":
        other = torch.full_like(x, 9)          # a second task, so the masks combine two tasks' scores
        masks = mk.build_mazo_masks(model, {"seven": [dict(input_ids=x, labels=labels)],
                                            "nine": [dict(input_ids=x, labels=other)]}, density=0.5)
    if masks is not None:
        assert masks and all(n in dict(model.named_parameters()) for n in masks)
    opt = mk.ZOSGD(model.named_parameters(), lr=lr, eps=1e-3, module=model, seed=2, masks=masks, backend=BACKEND,
                   dist=dist)
    losses = [float(opt.step(closure)) for _ in range(150)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert math.isfinite(last)
    if method == "sparse-mezo":
        # slower by design: a weight that learns (grows past tau) leaves the selection; a static mask of the same
        # elements falls faster, and one of the large weights faster still (measured while writing this test)
        assert last < first - 0.1, (first, last)
    else:
        assert last < 0.6 * first, (first, last)


def test_forward_mode_eval_and_train():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1))
    model.train()
    model[2].eval()                           # a mixed-mode model: each module's flag must come back as it was
    x = torch.randn(16, 8)
    seen = []

    def closure():
        seen.append((model.training, model[1].training))
        h = model[1](model[0](x))
        seen.append((h == 0).clone())
        return model[2](h).pow(2).mean()

    opt = mk.ZOSGD(model.named_parameters(), lr=1e-3, module=model, backend=BACKEND)
    opt.step(closure)
    assert seen[0] == (False, False) and seen[2] == (False, False)      # eval during the forwards
    assert not seen[1].any()                                             # dropout off
    assert model.training and model[1].training and not model[2].training

    seen.clear()
    rng = torch.get_rng_state()
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-3, module=model, forward_mode="train", backend=BACKEND)
    opt.step(closure)
    assert seen[0] == (True, True)
    assert seen[1].any() and torch.equal(seen[1], seen[3])              # both forwards: the same dropout mask
    assert torch.equal(torch.get_rng_state(), rng)                      # the global RNG stream is untouched
    first = seen[1]
    seen.clear()
    opt.step(closure)
    assert torch.equal(seen[1], seen[3]) and not torch.equal(seen[1], first)   # a new mask each step
    second = seen[1]
    seen.clear()
    again = mk.ZOSGD(model.named_parameters(), lr=1e-3, module=model, forward_mode="train", backend=BACKEND)
    again.step(closure)
    again.step(closure)
    assert torch.equal(seen[1], first) and torch.equal(seen[5], second)      # masks follow the step seeds


def test_forward_mode_eval_honours_a_custom_train():
    """A module class that overrides train() gets its train(False) during the forwards (the fast path writes the
    flags directly only when no module does); every flag is back afterwards, and a model already in eval mode is
    left alone."""
    calls = []

    class Custom(nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = nn.Sequential(Custom(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    seen = []

    def closure():
        seen.append([m.training for m in model.modules()])
        return model(x).pow(2).mean()

    opt = mk.ZOSGD(model.named_parameters(), lr=1e-3, module=model, backend=BACKEND)
    opt.step(closure)
    assert False in calls and all(not any(s) for s in seen)
    assert all(m.training for m in model.modules())
    model.eval()
    calls.clear()
    seen.clear()
    opt.step(closure)
    assert calls == [] and all(not any(s) for s in seen) and not any(m.training for m in model.modules())


@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_inference_mode_forwards_give_the_same_steps(mode):
    """inference_mode=True (the default) runs the closure under torch.inference_mode(), False under no_grad; the
    forwards compute the same losses, so the weights, losses and seed logs of three steps are equal bit for bit."""
    runs = {}
    for im in (True, False):
        model = _tiny_llama(torch.bfloat16, seed=3)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
        seen = []

        def closure():
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return model(input_ids=ids, labels=ids).loss

        opt = mk.ZOSGD(model.named_parameters(), lr=1e-3, eps=1e-3, mode=mode, module=model, dist="gaussian_fast",
                       inference_mode=im, backend=BACKEND)
        losses = [opt.step(closure) for _ in range(3)]
        assert all(s == (im, False) for s in seen) and len(seen) == 6, seen
        assert not any(x.is_inference() for x in losses)       # the step's own results are normal tensors
        assert not any(p.is_inference() for p in model.parameters())
        runs[im] = ([_bits_of(p) for p in model.parameters()], [float(x) for x in losses],
                    [r["g_bits"] for r in opt.seed_log.steps])
    assert all(torch.equal(a, b) for a, b in zip(runs[True][0], runs[False][0]))
    assert runs[True][1:] == runs[False][1:]
    with pytest.raises(TypeError, match="inference_mode"):
        mk.ZOSGD(_tiny_llama(torch.float32).named_parameters(), inference_mode="yes")


def _bits_of(t):
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


def test_masks_leave_unselected_elements_alone():
    model = Quad()
    before = _named(model)
    sel = torch.rand(6, 12, generator=torch.Generator().manual_seed(0)) < 0.3
    masks = {"lin.weight": mk.BitMask.from_bool(sel), "scale": mk.ThresholdMask(1.0)}
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-2, masks=masks, backend=BACKEND)
    for _ in range(3):
        opt.step(model)
    w = model.lin.weight.detach()
    assert torch.equal(w[~sel], before["lin.weight"][~sel]) and not torch.equal(w[sel], before["lin.weight"][sel])
    big = before["scale"].abs() >= 1.0
    assert big.any() and (~big).any()
    assert torch.equal(model.scale.detach()[big], before["scale"][big])
    described = {p["name"]: p["mask"] for p in opt.seed_log.header["params"]}
    assert described == {"scale": {"kind": "threshold", "tau": 1.0}, "lin.weight": {"kind": "bitmask"},
                         "lin.bias": None}


@pytest.mark.parametrize("masked", [False, True])
def test_launches_carry_the_plan_groups_dense_aligned(masked, monkeypatch):
    """Every pass of a step passes its plan group's dense_aligned to the op: True for unmasked tensors at offset 0
    (the CUDA backend may then run its dense-only kernels), False where a tensor is masked."""
    import mazo_kernels.optim as optim_mod
    flags, op = [], optim_mod.zo_apply_

    def spy(*args, **kw):
        flags.append(args[17] if len(args) > 17 else kw.get("dense_aligned", False))
        return op(*args, **kw)

    monkeypatch.setattr(optim_mod, "zo_apply_", spy)
    model = Quad()
    masks = {"lin.weight": mk.ThresholdMask(0.5)} if masked else None
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-2, masks=masks, backend=BACKEND)
    opt.step(model)
    assert len(flags) == 3 and all(f is (not masked) for f in flags), flags


def test_tied_weights_appear_once():
    model = _tiny_llama(torch.float32, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pairs = list(model.named_parameters(remove_duplicate=False))
    opt = mk.ZOSGD(pairs, lr=1e-3, module=model, backend=BACKEND)
    names = opt.param_groups[0]["param_names"]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(opt.plan) == len(list(model.parameters()))
    # a mask may be given under either name of a tied weight
    mk.ZOSGD(pairs, lr=1e-3, masks={"lm_head.weight": mk.ThresholdMask(0.01)}, backend=BACKEND)


def test_frozen_parameters_are_not_touched():
    model = Quad()
    model.lin.weight.requires_grad_(False)
    before = _named(model)
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-2, backend=BACKEND)
    opt.step(model)
    assert torch.equal(model.lin.weight.detach(), before["lin.weight"])
    assert not torch.equal(model.lin.bias.detach(), before["lin.bias"])
    assert sorted(p["name"] for p in opt.seed_log.header["params"]) == ["lin.bias", "scale"]


def test_bad_arguments_raise_clear_errors():
    model = Quad()
    P = lambda: model.named_parameters()  # noqa: E731
    with pytest.raises(ValueError, match="Invalid learning rate"):
        mk.ZOSGD(P(), lr=-1.0)
    with pytest.raises(ValueError, match="Invalid eps"):
        mk.ZOSGD(P(), eps=0.0)
    with pytest.raises(ValueError, match="Invalid eps"):
        mk.ZOSGD([{"params": list(P()), "eps": -1e-3}])
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        mk.ZOSGD(P(), weight_decay=float("nan"))
    with pytest.raises(ValueError, match="mode must be"):
        mk.ZOSGD(P(), mode="sideways")
    with pytest.raises(ValueError, match="needs module="):
        mk.ZOSGD(P(), mode="transient")
    with pytest.raises(ValueError, match="unknown parameter names.*'nope'"):
        mk.ZOSGD(P(), masks={"nope": mk.ThresholdMask(0.1)})
    with pytest.raises(TypeError, match="needs parameter names"):
        mk.ZOSGD(model.parameters())
    with pytest.raises(ValueError, match="dist must be"):
        mk.ZOSGD(P(), dist="uniform")
    with pytest.raises(ValueError, match="estimator must be"):
        mk.ZOSGD(P(), estimator="three_sided")
    with pytest.raises(ValueError, match="num_perturbations"):
        mk.ZOSGD(P(), num_perturbations=0)
    with pytest.raises(ValueError, match="rounding must be"):
        mk.ZOSGD(P(), rounding="up")
    with pytest.raises(ValueError, match="forward_mode must be"):
        mk.ZOSGD(P(), forward_mode="test")
    with pytest.raises(ValueError, match="unknown backend"):
        mk.ZOSGD(P(), backend="fpga")
    with pytest.raises(ValueError, match="empty parameter list"):
        mk.ZOSGD([])
    with pytest.raises(ValueError, match="not parameters of the module"):
        mk.ZOSGD(P(), mode="transient", module=nn.Linear(2, 2))
    # errors at step time leave the weights untouched
    before = _named(model)
    opt = mk.ZOSGD(P(), lr=1e-2, backend=BACKEND)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step(model)
    opt.param_groups[0]["lr"] = 1e-2
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: torch.ones(3))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.ones(2)))]})
