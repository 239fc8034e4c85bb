"""Device-held seeds (the op's seed_dev) and GraphedZOStep: same bits as the int-seeded op and the eager ZOSGD step.

The CPU runs the device-seeded step without a graph (use_graph=False, the same code that is captured); the capture
itself and its replays are checked against eager steps on a GPU (test_gpu_cuda_graph below, skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import reference as ref
from mazo_kernels.api import _seed_bits as _signed     # uint64 seed -> the int64 bits the op carries
from mazo_kernels.ops import zo_apply_
from test_optim import Quad                             # the small regression model the optimizer tests use

CPU_BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or mk.has_cpu()]
M64 = (1 << 64) - 1


def _plan(gen, dtype, sizes=(1000, 4099, 77)):
    tensors = []
    for n in sizes:
        w = torch.randn(n, generator=gen) * 0.02
        w[::5] *= 40.0
        tensors.append(w.to(dtype))
    return mk.ZOPlan([(f"block{i}.weight", t) for i, t in enumerate(tensors)]), tensors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_seed_dev_gives_the_bits_of_int_seeds(backend, dtype):
    gen = torch.Generator().manual_seed(int(dtype.itemsize) * 7 + len(backend))
    plan_a, ta = _plan(gen, dtype)
    start = [t.clone() for t in ta]
    plan_b = mk.ZOPlan([(e.name, e.tensor.clone()) for e in plan_a.entries])
    seeds = [int(torch.randint(0, 2 ** 62, (1,), generator=gen)) * 3 + 2 ** 63 for _ in range(3)]
    seeds = [s & M64 for s in seeds]
    sr = (seeds[0] * 5 + 1) & M64
    gs = torch.randn(2, generator=gen)
    ga, gb = plan_a.groups[0], plan_b.groups[0]
    empty = torch.zeros(0)
    # perturb (+scale), perturb with prior (restore), update with restore + SR over two directions
    calls = [([seeds[0]], empty, ref.OP_PERTURB, ref.ROUND_NEAREST, 0.0, 1e-2, 0.0),
             ([seeds[0]], empty, ref.OP_PERTURB, ref.ROUND_NEAREST, 1e-2, -1e-2, 0.0),
             ([seeds[0], seeds[1], seeds[2]], gs, ref.OP_UPDATE, ref.ROUND_STOCHASTIC, -1e-2, 0.0, 0.5)]
    for sd, g, op, rnd, prior, scale, lr in calls:
        zo_apply_(ga.tensors, [], ga.masks, ga.meta, ga.fvals, [_signed(s) for s in sd], g, op, ref.DIST_GAUSSIAN,
                  rnd, _signed(sr), ref.THRESH_LATCH_READ, scale, prior, lr, backend)
        # the int arguments carry other values: the kernels must take seed_dev's
        dev = torch.tensor([_signed(s) for s in sd] + [_signed(sr)], dtype=torch.int64)
        fake = [_signed((s ^ 0x5555) & M64) for s in sd]
        if len(sd) > 1:
            fake[1] = fake[0] if sd[1] == sd[0] else fake[1]
        zo_apply_(gb.tensors, [], gb.masks, gb.meta, gb.fvals, fake, g, op, ref.DIST_GAUSSIAN, rnd, 12345,
                  ref.THRESH_LATCH_READ, scale, prior, lr, backend, dev)
        for x, y in zip(ga.tensors, gb.tensors):
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    for a, b in zip(start, ta):          # every tensor moved (the calls did something to compare)
        assert not torch.equal(a, b)


def test_seed_dev_is_validated_before_any_write():
    gen = torch.Generator().manual_seed(3)
    plan, _ = _plan(gen, torch.bfloat16)
    g = plan.groups[0]
    before = [t.clone() for t in g.tensors]
    for bad, msg in [(torch.zeros(1, dtype=torch.int64), "len\\(seeds\\) \\+ 1"),
                     (torch.zeros(2, dtype=torch.int32), "int64"),
                     (torch.zeros(2, 1, dtype=torch.int64), "1-D")]:
        with pytest.raises(ValueError, match=msg):
            zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB,
                      ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, ref.THRESH_LATCH_WRITE, 1e-2, 0.0, 0.0,
                      CPU_BACKENDS[-1], bad)
    for a, b in zip(before, g.tensors):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.skipif(not mk.has_cpu(), reason="the C++ extension is not built")
def test_cpp_op_checks_seed_dev():
    """The C++ op checks seed_dev too (other libraries call it directly). In a child process: on the GPU machine
    (torch 2.11, Python 3.12) an error raised by the CPU extension's checks was seen to crash the process
    (bench/check_cpp_errors.py), and a crash must fail this test, not end the run."""
    import subprocess
    import sys
    code = """
import torch, mazo_kernels as mk
from mazo_kernels import reference as ref
mk.has_cuda()
w = (torch.randn(1000) * 0.02).to(torch.bfloat16)
g = mk.ZOPlan([("a.weight", w)]).groups[0]
before = w.clone()
try:
    torch.ops.mazo_C.zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [1, 2], torch.zeros(1), ref.OP_UPDATE,
                               ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, 0.0, 0.0, 1.0,
                               torch.zeros(2, dtype=torch.int64))
    print("returned")
except RuntimeError as e:
    print("raised", "seed_dev" in str(e), torch.equal(before.view(torch.int16), w.view(torch.int16)))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"the child crashed (rc {p.returncode}): {p.stderr[-500:]}"
    assert p.stdout.strip().splitlines()[-1] == "raised True True"


def _log_view(opt):
    return [{k: r[k] for k in ("step", "seeds", "sr_seed", "g_bits", "skipped", "lr", "eps")}
            for r in opt.seed_log.steps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator,q,dist", [("two_sided", 1, "gaussian"), ("one_sided", 2, "rademacher"),
                                              ("two_sided", 2, "gaussian"), ("two_sided", 1, "gaussian_fast")])
def test_device_seeded_step_is_the_eager_step(dtype, estimator, q, dist):
    backend = "cpu" if mk.has_cpu() else "reference"
    kw = dict(lr=0.05, eps=1e-2, weight_decay=0.1, seed=21, estimator=estimator, num_perturbations=q, dist=dist,
              backend=backend)
    ma, mb = Quad(dtype), Quad(dtype)
    oa = mk.ZOSGD(ma.named_parameters(), module=ma, **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, **kw)
    step = mk.GraphedZOStep(ob, mb, warmup=1, use_graph=False)      # one eager warm-up step, then device seeds
    assert not step.captured
    oa.step(ma)
    for k in range(1, 5):
        if k == 3:                                                     # a scheduler changes lr between steps
            for o in (oa, ob):
                o.param_groups[0]["lr"] = 0.02
        la, lb = oa.step(ma), step()
        assert torch.equal(la, lb), k
        for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
            assert torch.equal(p.detach(), r.detach()), (k, n)
    assert _log_view(oa) == _log_view(ob)
    assert len(ob.seed_log) == 5
    assert any(not torch.equal(p.detach(), q_) for p, q_ in zip(mb.parameters(), Quad(dtype).parameters()))


@pytest.mark.parametrize("mask", ["threshold", "bitmask"])
def test_device_seeded_step_with_masks_is_the_eager_step(mask):
    backend = "cpu" if mk.has_cpu() else "reference"
    kw = dict(lr=0.05, eps=1e-2, seed=8, backend=backend)
    ma, mb = Quad(torch.bfloat16), Quad(torch.bfloat16)

    def masks(m):
        w = m.lin.weight.detach()
        if mask == "threshold":
            return {"lin.weight": mk.ThresholdMask(float(w.float().abs().median()))}
        sel = torch.zeros(w.numel(), dtype=torch.bool)
        sel[::3] = True
        return {"lin.weight": mk.BitMask.from_bool(sel.view(w.shape))}

    oa = mk.ZOSGD(ma.named_parameters(), module=ma, masks=masks(ma), **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, masks=masks(mb), **kw)
    step = mk.GraphedZOStep(ob, mb, warmup=1, use_graph=False)
    oa.step(ma)
    for k in range(3):
        assert torch.equal(oa.step(ma), step())
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n
    assert _log_view(oa) == _log_view(ob)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_device_seeded_step_restores_weights_when_the_closure_fails(fail_at):
    backend = "cpu" if mk.has_cpu() else "reference"
    kw = dict(lr=0.05, eps=1e-2, weight_decay=0.3, seed=5, backend=backend)
    ma, mb = Quad(torch.bfloat16), Quad(torch.bfloat16)
    oa = mk.ZOSGD(ma.named_parameters(), module=ma, **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, **kw)
    step = mk.GraphedZOStep(ob, lambda: mb(), warmup=0, use_graph=False)
    calls = [0, 0]

    def failing(model, i):
        def closure():
            calls[i] += 1
            if calls[i] == fail_at:
                raise RuntimeError("boom")
            return model()
        return closure

    with pytest.raises(RuntimeError, match="boom"):
        oa.step(failing(ma, 0))
    step.closure = failing(mb, 1)
    with pytest.raises(RuntimeError, match="boom"):
        step()
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n
    assert ob.seed_log.steps[0]["skipped"] is True and "boom" in ob.seed_log.steps[0]["error"]
    step.closure = lambda: mb()
    oa.step(ma)
    step()
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("dtype,mask,q", [(torch.bfloat16, None, 1), (torch.float32, None, 2),
                                          (torch.bfloat16, "threshold", 1)])
def test_device_seeded_lookahead_step_is_the_eager_lookahead_step(warmup, dtype, mask, q):
    """ZOSGD(lookahead=True) under GraphedZOStep: the step starts at its first forward (the previous update applied
    the +eps pass; the first step, and a step after an eps change, apply it eagerly), the update applies the next
    step's +eps pass from the device seeds; weights, losses, the log and settle() match the eager lookahead steps bit
    for bit, and replay rebuilds the settled weights."""
    backend = "cpu" if mk.has_cpu() else "reference"
    kw = dict(lr=0.05, eps=1e-2, weight_decay=0.1, seed=17, backend=backend, num_perturbations=q, lookahead=True)
    ma, mb = Quad(dtype), Quad(dtype)
    start = {n: p.detach().clone() for n, p in mb.named_parameters()}
    if mask:
        tau = float(ma.lin.weight.detach().float().abs().median())
        kw["masks"] = {"lin.weight": mk.ThresholdMask(tau)}
    oa = mk.ZOSGD(ma.named_parameters(), module=ma, **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, **kw)
    step = mk.GraphedZOStep(ob, mb, warmup=warmup, use_graph=False)
    for _ in range(warmup):
        oa.step(ma)
    for k in range(5):
        if k == 2:                                  # an eps change: the carried +eps pass is settled, then redone
            for o in (oa, ob):
                o.param_groups[0]["eps"] = 2e-2
        if k == 3:
            for o in (oa, ob):
                o.param_groups[0]["lr"] = 0.02
        la, lb = oa.step(ma), step()
        assert torch.equal(la, lb), k
        assert oa.carries_perturbation and ob.carries_perturbation
        for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
            assert torch.equal(p.detach(), r.detach()), (k, n)
    oa.settle()
    ob.settle()
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n
    assert _log_view(oa) == _log_view(ob)
    assert [r.get("settled_seed") for r in oa.seed_log.steps] == [r.get("settled_seed") for r in ob.seed_log.steps]
    fresh = Quad(dtype)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(start[n])
    mk.replay(fresh, ob.state_dict()["seed_log"], backend=backend)
    for (n, p), (_, r) in zip(fresh.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n


def test_device_seeded_lookahead_step_restores_weights_when_the_closure_fails():
    """A closure failing in a lookahead step under GraphedZOStep: the remaining pass and an lr = 0 update run, the
    next step's +eps is still applied (as the eager step does), and the next step is the eager one again."""
    backend = "cpu" if mk.has_cpu() else "reference"
    kw = dict(lr=0.05, eps=1e-2, seed=9, backend=backend, lookahead=True)
    ma, mb = Quad(torch.bfloat16), Quad(torch.bfloat16)
    oa = mk.ZOSGD(ma.named_parameters(), module=ma, **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, **kw)
    step = mk.GraphedZOStep(ob, lambda: mb(), warmup=1, use_graph=False)
    oa.step(ma)

    def failing(model):
        calls = [0]

        def closure():
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("boom")
            return model()
        return closure

    with pytest.raises(RuntimeError, match="boom"):
        oa.step(failing(ma))
    step.closure = failing(mb)
    with pytest.raises(RuntimeError, match="boom"):
        step()
    assert oa.carries_perturbation and ob.carries_perturbation
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n
    step.closure = lambda: mb()
    assert torch.equal(oa.step(ma), step())
    for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p.detach(), r.detach()), n
    assert _log_view(oa) == _log_view(ob)


def test_graphed_step_refuses_what_it_cannot_capture():
    m = Quad(torch.float32)
    backend = "cpu" if mk.has_cpu() else "reference"
    with pytest.raises(ValueError, match="inplace"):
        mk.GraphedZOStep(mk.ZOSGD(m.named_parameters(), module=m, mode="transient", backend=backend), m,
                         use_graph=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        mk.GraphedZOStep(mk.ZOSGD(m.named_parameters(), module=m, backend=backend), m)
    with pytest.raises(ValueError, match="loss_reduce"):
        mk.GraphedZOStep(mk.ZOSGD(m.named_parameters(), module=m, backend=backend, loss_reduce=lambda v: v), m,
                         use_graph=False)
    with pytest.raises(TypeError, match="ZOSGD"):
        mk.GraphedZOStep(torch.optim.SGD(m.parameters(), lr=0.1), m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")
                                     if (b == "cuda" and mk.has_cuda()) or (b == "triton" and mk.has_triton())])
@pytest.mark.parametrize("dtype,mask,q,lookahead", [(torch.float32, None, 1, False), (torch.bfloat16, None, 1, False),
                                                    (torch.bfloat16, "threshold", 1, False),
                                                    (torch.bfloat16, None, 2, False), (torch.bfloat16, None, 1, True),
                                                    (torch.bfloat16, "threshold", 1, True)])
def test_gpu_cuda_graph_replays_the_eager_steps(backend, dtype, mask, q, lookahead):
    """Captured and replayed: every replay is the eager step of the same index, weights and log bit for bit
    (lookahead: the replay starts at the first forward and its update applies the next step's +eps pass)."""
    kw = dict(lr=0.05, eps=1e-2, weight_decay=0.1, seed=33, backend=backend, num_perturbations=q,
              lookahead=lookahead)
    ma, mb = Quad(dtype).cuda(), Quad(dtype).cuda()
    if mask:
        tau = float(ma.lin.weight.detach().float().abs().median())
        kw["masks"] = {"lin.weight": mk.ThresholdMask(tau)}
    oa = mk.ZOSGD(ma.named_parameters(), module=ma, **kw)
    ob = mk.ZOSGD(mb.named_parameters(), module=mb, **kw)
    step = mk.GraphedZOStep(ob, mb, warmup=2)
    assert step.captured
    for _ in range(2):
        oa.step(ma)
    for k in range(5):
        if k == 3:
            for o in (oa, ob):
                o.param_groups[0]["lr"] = 0.01
        la = oa.step(ma).clone()
        lb = step().clone()
        assert torch.equal(la, lb), k
        for (n, p), (_, r) in zip(ma.named_parameters(), mb.named_parameters()):
            assert torch.equal(p.detach(), r.detach()), (k, n)
    assert _log_view(oa) == _log_view(ob)
    assert len(ob.seed_log) == 7
