"""Restore fidelity: 1000 ZO steps at lr = 0 must leave the weights (nearly) where they were.

MeZO-style in-place +eps, -2eps, +eps with torch ops does not restore bf16 weights: the drift is a random walk (about
12% of the weight RMS after 1000 steps at eps = 1e-3). Ours inverts the rounding of each pass, so only elements whose
perturbed value lands in a coarser binade (|theta| small against |eps z|, or theta near the top of its binade) can
lose bits; where one is lost the restore keeps the candidate with the even bit pattern, so the loss does not
accumulate (docs/NOISE_SPEC.md, "Restore"). Measured for ours in bf16: about 0.16% of the weight RMS after 1000
steps (the issue's bound is 1%), and it stops growing.
Run with -s to see the table."""
from __future__ import annotations

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import ZOPlan

N = 1 << 14
STEPS = 1000
EPS = 1e-3
BACKEND = "cpu" if mk.has_cpu() else "reference"


def _init(dtype):
    g = torch.Generator().manual_seed(2024)
    return (torch.randn(N, generator=g) * 0.02).to(dtype)


def _rel_rms_drift(w, w0) -> float:
    d = w.double() - w0.double()
    return float(d.pow(2).mean().sqrt() / w0.double().pow(2).mean().sqrt())


def drift_ours(dtype, steps=STEPS, backend=BACKEND) -> float:
    w = _init(dtype)
    w0 = w.clone()
    plan = ZOPlan([("model.layers.0.weight", w)])
    for s in range(steps):
        seed = 0x5EED0000 + s
        mk.perturb_(plan, seed, EPS, backend=backend)                        # theta + eps z
        mk.perturb_(plan, seed, -EPS, prior=EPS, backend=backend)            # theta - eps z
        mk.update_(plan, [seed], [0.0], lr=0.0, restore_seed=seed, prior=-EPS, backend=backend)  # restore
    return _rel_rms_drift(w, w0)


def drift_mezo_style(dtype, steps=STEPS) -> float:
    w = _init(dtype)
    w0 = w.clone()
    for s in range(steps):
        for c in (EPS, -2 * EPS, EPS):
            torch.manual_seed(s)
            z = torch.normal(0.0, 1.0, size=w.shape, dtype=w.dtype)
            w.add_(z, alpha=c)
    return _rel_rms_drift(w, w0)


@pytest.fixture(scope="module")
def table():
    rows = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rows[dtype] = (drift_ours(dtype), drift_mezo_style(dtype))
    print(f"\nrestore drift after {STEPS} steps at lr=0, eps={EPS}, {N} weights ~ N(0, 0.02^2), backend={BACKEND}")
    print(f"{'dtype':>10} {'ours':>10} {'MeZO-style':>12}   (RMS drift / weight RMS)")
    for dtype, (ours, mezo) in rows.items():
        print(f"{str(dtype).replace('torch.', ''):>10} {100 * ours:9.4f}% {100 * mezo:11.4f}%")
    return rows


def test_bf16_drift(table):
    ours, mezo = table[torch.bfloat16]
    assert mezo > 0.05, mezo
    assert ours <= 0.01, (ours, mezo)          # the bound: 1% of the weight RMS after 1000 steps


def test_bf16_drift_is_bounded():
    """The even-candidate rule makes the drift stop growing: 4x the steps must not give ~2x the drift (a random walk
    would), and a weight once moved stays put."""
    short, long = drift_ours(torch.bfloat16, steps=150), drift_ours(torch.bfloat16, steps=600)
    assert long < 1.4 * short, (short, long)


def test_fp16_drift(table):
    ours, mezo = table[torch.float16]
    assert ours <= 0.01 and ours < mezo / 4, (ours, mezo)


def test_fp32_drift_is_tiny(table):
    ours, mezo = table[torch.float32]
    assert ours < 1e-5, ours
    assert mezo < 1e-4, mezo
