"""backend="fastest": each pass of a CUDA call on cuda or triton, from the measured table
mazo_kernels/backend_policy.py (bench/make_backend_policy.py). The bits are the backends' own (python_tests/
test_gpu_backends.py runs the step with it on a GPU); here: the table is the generator's output for its sources, a
pass maps to the table's key, the op dispatches to the chosen backend, and the errors."""
import os
import re
import subprocess
import sys

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import _backends, backend_policy
from mazo_kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_policy_table_is_the_generators_output_for_its_sources(tmp_path):
    """Regenerate the table from the JSON files its docstring names: the same file, byte for byte."""
    sources = re.findall(r"^- (bench/results/\S+\.json)$", backend_policy.__doc__, re.M)
    assert len(sources) >= 2, backend_policy.__doc__
    out = tmp_path / "policy.py"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_backend_policy.py"), "--input",
                          *[os.path.join(ROOT, s) for s in sources], "--ratio", str(backend_policy.RATIO),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(ROOT, "mazo_kernels", "backend_policy.py")) as f:
        assert out.read_text() == f.read()


def test_generator_keeps_cuda_unless_triton_wins_every_measurement(tmp_path):
    """Triton is chosen for a key only where every model and both byte masks had it at most --ratio of CUDA."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import make_backend_policy as gen
    finally:
        sys.path.pop(0)
    cases = {("7b", "bf16", "threshold", "update_", "rademacher"): {"cuda": 20.0, "triton": 15.0},
             ("7b", "bf16", "bitmask", "update_", "rademacher"): {"cuda": 20.0, "triton": 16.0},
             ("125m", "bf16", "threshold", "update_", "rademacher"): {"cuda": 1.0, "triton": 0.9},
             ("7b", "bf16", "threshold", "perturb_", "rademacher"): {"cuda": 20.0, "triton": 15.0},
             ("7b", "bf16", "bitmask", "perturb_", "rademacher"): {"cuda": 20.0, "triton": 19.5},   # 0.975: no
             ("7b", "fp16", "none", "update_", "gaussian"): {"cuda": 10.0, "triton": 9.5},            # 0.95: yes
             ("7b", "fp32", "rowindex", "update_", "gaussian"): {"cuda": 10.0}}                      # unpaired
    keys, n = gen.triton_keys(cases, 0.95)
    assert keys == [("bf16", "bytes", "update_", "rademacher"), ("fp16", "none", "update_", "gaussian")]
    assert n == 3


@pytest.mark.parametrize("op,prior,name", [(ref.OP_PERTURB, 0.0, "perturb_"), (ref.OP_PERTURB, 1e-3, "perturb_prior"),
                                           (ref.OP_UPDATE, -1e-3, "update_"), (ref.OP_UPDATE, 0.0, "update0"),
                                           (ref.OP_COPY, 0.0, "perturbed_copy"),
                                           (ref.OP_UPDATE_PERTURB, -1e-3, "update_next")])
def test_pass_backend_reads_the_table_key(op, prior, name, monkeypatch):
    t = torch.zeros(64, dtype=torch.bfloat16)
    none, latch = torch.zeros(0, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    rows = torch.zeros((8, 4), dtype=torch.int32)
    monkeypatch.setattr(backend_policy, "TRITON", frozenset({("bf16", "bytes", name, "gaussian_fast"),
                                                             ("fp32", "rowindex", name, "rademacher")}))
    G, R = ref.DIST_GAUSSIAN_FAST, ref.DIST_RADEMACHER
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [none, latch, none]) == "triton"
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [none, none]) == "cuda"          # class none
    assert _backends.pass_backend(op, R, prior, torch.bfloat16, [latch]) == "cuda"               # other noise
    assert _backends.pass_backend(op, G, prior, torch.float16, [latch]) == "cuda"                # other dtype
    assert _backends.pass_backend(op, R, prior, torch.float32, [latch, rows]) == "triton"        # row-index wins
    assert _backends.pass_backend(op, G, prior, torch.bfloat16, [latch, rows]) == "cuda"
    del t


def test_the_measured_table_mixes_backends_in_a_masked_bf16_step():
    """The point of "fastest": on the table as measured, a Sparse MeZO bf16 step (gaussian_fast) runs its first
    pass on one backend and its restoring passes on the other."""
    latch = torch.zeros(8, dtype=torch.uint8)
    G = ref.DIST_GAUSSIAN_FAST
    chosen = {_backends.pass_backend(op, G, prior, torch.bfloat16, [latch])
              for op, prior in ((ref.OP_PERTURB, 0.0), (ref.OP_PERTURB, 1e-3), (ref.OP_UPDATE, -1e-3))}
    assert chosen == {"cuda", "triton"}


def test_op_dispatches_each_pass_to_the_chosen_backend(monkeypatch):
    """zo_apply_(backend="fastest") asks pass_backend and runs that backend's kernel with the call's arguments."""
    calls = []

    def fake_kernel(backend):
        def run(*args, **kw):
            calls.append(backend)
        return run

    monkeypatch.setattr(_backends, "kernel", fake_kernel)
    monkeypatch.setattr(_backends, "pass_backend", lambda op, dist, prior, dtype, masks:
                        "triton" if op == ref.OP_UPDATE else "cuda")
    w = [torch.randn(16, dtype=torch.bfloat16)]
    meta = torch.tensor([[1, 0, ref.MASK_NONE, 0]], dtype=torch.int64)
    fv = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    gs = torch.zeros(0)
    mk.ops.zo_apply_(w, [], [torch.zeros(0, dtype=torch.uint8)], meta, fv, [3], gs, ref.OP_PERTURB,
                     ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, 0, 1e-3, 0.0, 0.0, "fastest")
    mk.ops.zo_apply_(w, [], [torch.zeros(0, dtype=torch.uint8)], meta, fv, [3, 4], torch.ones(1), ref.OP_UPDATE,
                     ref.DIST_GAUSSIAN, ref.ROUND_NEAREST, 0, 0, 0.0, 1e-3, 1e-2, "fastest")
    assert calls == ["cuda", "triton"]


def test_fastest_needs_cuda_tensors_and_both_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend 'fastest' .* runs on CUDA tensors; these are on cpu"):
        _backends.resolve("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose auto, reference, cpu, triton, cuda or fastest"):
        _backends.resolve("quickest", torch.device("cpu"))
    monkeypatch.setattr(_backends, "has_cuda", lambda: False)
    with pytest.raises(_backends.BackendUnavailable, match="'fastest' backend picks cuda or triton per pass and "
                                                           "needs both: the 'cuda' backend needs"):
        _backends.require("fastest")
    monkeypatch.setattr(_backends, "has_cuda", lambda: True)
    monkeypatch.setattr(_backends, "has_triton", lambda: False)
    with pytest.raises(_backends.BackendUnavailable, match="needs both: the 'triton' backend needs"):
        _backends.require("fastest")


def test_fastest_on_cpu_plan_is_refused_before_any_write():
    plan = mk.ZOPlan([("w", torch.randn(32))])
    before = plan.entries[0].tensor.clone()
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        mk.perturb_(plan, 1, 1e-3, backend="fastest")
    assert torch.equal(plan.entries[0].tensor, before)
