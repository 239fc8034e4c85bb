"""ZOSGD(lookahead=True): each update also applies the next step's +eps pass (op 3). The weights every forward sees
must be the bits a plain ZOSGD gives, settle() must leave weights that replay rebuilds, and the carried perturbation
must survive an eps change and a state-dict round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mazo_kernels as mk

BACKEND = "cpu" if mk.has_cpu() else "reference"
# on a GPU machine also the kernels that fuse op 3 (CUDA's dense-only kernels, Triton's unmasked calls)
GPU = [b for b, ok in (("cuda", mk.has_cuda()), ("triton", mk.has_triton())) if ok and torch.cuda.is_available()]


class Quad(nn.Module):
    """test_optim.Quad's regression model at sizes that are multiples of 8 (CUDA's fused kernel takes only whole
    units of 8), in bf16 (where the restores lose bits) and with small weights (near a threshold mask's tau)."""

    def __init__(self, dtype=torch.bfloat16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.randn(8, generator=g) * 0.3 + 1.0)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(8, 16, generator=g) * 0.05)
            self.lin.bias.copy_(torch.randn(8, generator=g) * 0.02)
        self.register_buffer("x", torch.randn(32, 16, generator=g))
        self.register_buffer("y", torch.randn(32, 8, generator=g))
        self.to(dtype)

    def forward(self):
        out = self.lin(self.x) * self.scale
        return ((out.float() - self.y.float()) ** 2).mean()


def _pair(masks=None, backend=BACKEND, **kw):
    dev = "cuda" if backend in ("cuda", "triton") else "cpu"
    a, b = Quad().to(dev), Quad().to(dev)
    mk_masks = (lambda: {n: mk.ThresholdMask(0.04) for n in ("lin.weight",)}) if masks else (lambda: None)
    common = dict(lr=5e-3, eps=1e-2, seed=123, backend=backend, dist="gaussian_fast", **kw)
    oa = mk.ZOSGD(a.named_parameters(), masks=mk_masks(), **common)
    ob = mk.ZOSGD(b.named_parameters(), masks=mk_masks(), lookahead=True, **common)
    return a, b, oa, ob


def _bits(t):
    return t.detach().view(torch.int16).clone()


def _perturbed_like(model, opt, k, backend=BACKEND):
    """model's weights after step k's first pass (+eps z(step k's seed)), computed on copies."""
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    masks = {"lin.weight": mk.ThresholdMask(0.04)} if any(e.mask is not None for e in opt.plan.entries) else {}
    plan = mk.ZOPlan([mk.PlanEntry(n, t, mk.stable_tensor_id(n), mask=masks.get(n)) for n, t in named])
    seed = mk.step_seeds(123, k)[0][0]
    mk.perturb_(plan, seed, opt.param_groups[0]["eps"], dist="gaussian_fast", backend=backend)
    return dict(named)


@pytest.mark.parametrize("backend", [BACKEND] + GPU)
@pytest.mark.parametrize("masks", [False, True], ids=["dense", "threshold"])
def test_lookahead_steps_see_the_same_weights(masks, backend):
    a, b, oa, ob = _pair(masks, backend)
    for k in range(6):
        la, lb = oa.step(a), ob.step(b)
        assert torch.equal(la, lb), k                 # both forwards of the step saw the same bits
        assert ob.carries_perturbation
        want = _perturbed_like(a, oa, k + 1, backend)  # the plain run's next +eps pass, on copies
        for n, p in b.named_parameters():
            assert torch.equal(_bits(p), _bits(want[n])), (k, n)
        if k == 2:
            ob.settle()                               # e.g. an evaluation between steps
            assert not ob.carries_perturbation
    ob.settle()
    moved = sum(int((_bits(p).cpu() != _bits(q)).sum()) for p, q in zip(a.parameters(), Quad().parameters()))
    assert moved > 0


def test_settled_weights_replay_bit_exactly_and_eps_changes_settle_first():
    a, b, oa, ob = _pair(True)
    for k in range(5):
        if k == 3:   # a schedule changing eps: the carried +eps (old eps) is undone before the step
            for o in (oa, ob):
                o.param_groups[0]["eps"] = 2e-2
        la, lb = oa.step(a), ob.step(b)
        # From the settle on, the weights are the restore of the carried ones: the plain run's except where that
        # restore is inexact (a perturbed value in a coarser binade), so only the log's replay must match them.
        assert k >= 3 or torch.equal(la, lb), k
    ob.settle()
    settled = [s.get("settled_seed") for s in ob.seed_log.steps]
    assert settled[2] == mk.step_seeds(123, 3)[0][0] and settled[-1] == mk.step_seeds(123, 5)[0][0]
    assert sum(s is not None for s in settled) == 2
    fresh = Quad()
    mk.replay(fresh, ob.seed_log, backend=BACKEND, masks=None)
    for (n, p), q in zip(b.named_parameters(), fresh.parameters()):
        assert torch.equal(_bits(p), _bits(q)), n
    # the plain run's log replays to the plain run's weights (no settle records there)
    fresh = Quad()
    mk.replay(fresh, oa.seed_log, backend=BACKEND)
    for (n, p), q in zip(a.named_parameters(), fresh.parameters()):
        assert torch.equal(_bits(p), _bits(q)), n


def test_state_dict_carries_the_perturbation():
    a, b, oa, ob = _pair()
    for _ in range(3):
        oa.step(a), ob.step(b)
    sd = ob.state_dict()
    c = Quad()
    c.load_state_dict(b.state_dict())                 # the model saved between steps: perturbed
    oc = mk.ZOSGD(c.named_parameters(), lr=5e-3, eps=1e-2, seed=123, backend=BACKEND, dist="gaussian_fast",
                  lookahead=True)
    oc.load_state_dict(sd)
    assert oc.carries_perturbation
    for _ in range(2):
        la, lc = oa.step(a), oc.step(c)
        assert torch.equal(la, lc)


def test_lookahead_refuses_other_schedules():
    m = Quad()
    with pytest.raises(ValueError, match="lookahead"):
        mk.ZOSGD(m.named_parameters(), estimator="one_sided", lookahead=True, backend=BACKEND)
    with pytest.raises(ValueError, match="lookahead"):
        mk.ZOSGD(m.named_parameters(), mode="transient", module=m, lookahead=True, backend=BACKEND)
    with pytest.raises(TypeError, match="lookahead"):
        mk.ZOSGD(m.named_parameters(), lookahead=1, backend=BACKEND)
    # GraphedZOStep takes lookahead steps (python_tests/test_cuda_graph.py); its other limits still apply
    opt = mk.ZOSGD(m.named_parameters(), lookahead=True, backend=BACKEND, loss_reduce=lambda v: v)
    with pytest.raises(ValueError, match="loss_reduce"):
        mk.GraphedZOStep(opt, m, use_graph=False)


def test_failed_closure_keeps_the_schedule():
    """A closure that raises mid-step: the step ends as a lr = 0 step (and still applies the next +eps)."""
    a, b, oa, ob = _pair()
    oa.step(a), ob.step(b)
    calls = {"n": 0}

    def bad(model):
        def closure():
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                raise RuntimeError("boom")
            return model()
        return closure
    for o, m in ((oa, a), (ob, b)):
        with pytest.raises(RuntimeError, match="boom"):
            o.step(bad(m))
    assert ob.carries_perturbation
    for _ in range(2):
        assert torch.equal(oa.step(a), ob.step(b))
    ob.settle()
    fresh = Quad()
    mk.replay(fresh, ob.seed_log, backend=BACKEND)
    for p, q in zip(b.parameters(), fresh.parameters()):
        assert torch.equal(_bits(p), _bits(q))
