"""A one-minute tour of the kernels on an embedded default: `python -m mazo_kernels.ops_demo` (or `python -m mazo_kernels.demo --ops`).

(a) noise() is bit-identical on every backend available here;
(b) ZO steps (perturb +eps, perturb -eps, fused restore + update) drive a toy quadratic loss down;
(c) restore drift in bf16 at lr = 0: ours against MeZO-style in-place +eps, -2eps, +eps.

Runs on CPU (C++ backend if built, else the pure-torch reference) or on a GPU (CUDA / Triton backends).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    # Triton runs on CPU tensors only in its interpreter, which must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mazo_kernels as mk  # noqa: E402
from mazo_kernels import _backends  # noqa: E402
from mazo_kernels import reference as ref  # noqa: E402

# A small "model": names and shapes like a 2-layer transformer's trainable weights (about 300 k elements).
DEFAULT_SHAPES = [
    ("model.embed_tokens.weight", (512, 128)),
    ("model.layers.0.self_attn.qkv_proj.weight", (384, 128)),
    ("model.layers.0.self_attn.o_proj.weight", (128, 128)),
    ("model.layers.0.mlp.up_proj.weight", (512, 128)),
    ("model.layers.0.mlp.down_proj.weight", (128, 512)),
    ("model.layers.0.input_layernorm.weight", (128,)),
    ("lm_head.weight", (256, 128)),
]


def make_params(dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(name, (torch.randn(shape, generator=g) * 0.02).to(dtype).to(device)) for name, shape in DEFAULT_SHAPES]


def available_backends(device):
    """Backends that can run on this machine, with the device their tensors live on."""
    out = [("reference", "cpu")]
    if mk.has_cpu():
        out.append(("cpu", "cpu"))
    if mk.has_triton():
        if torch.cuda.is_available():
            out.append(("triton", "cuda"))
        elif _backends.triton_interpreted():
            out.append(("triton (interpreted)", "cpu"))
    if torch.cuda.is_available() and mk.has_cuda():
        out.append(("cuda", "cuda"))
    return out


def _hex(x: torch.Tensor) -> str:
    b = x.detach().cpu().to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return " ".join(f"{int(v):08x}" for v in b)


def section_noise(n=4096):
    print("(a) noise(seed, tensor_id, offset, n) on every backend available here")
    seed = 2 ** 63 + 2024
    tid = mk.stable_tensor_id("model.layers.0.self_attn.qkv_proj.weight")
    offset = 1_000_003      # the shard's global offset: noise depends on the global index only
    expect = ref.noise(seed, tid, torch.arange(offset, offset + n))
    print(f"    seed={seed} tensor_id={tid} offset={offset} n={n}")
    print(f"    {'backend':<22}{'first values':<44}{'first bits':<20}{'bit-equal to reference':<24}")
    for name, device in available_backends(None):
        backend = name.split()[0]
        try:
            t0 = time.perf_counter()
            z = mk.noise(seed, tid, offset, n, device=device, backend=backend)
            dt = time.perf_counter() - t0
            same = torch.equal(z.cpu().view(torch.int32), expect.view(torch.int32))
            vals = " ".join(f"{v:+.5f}" for v in z[:4].tolist())
            print(f"    {name:<22}{vals:<44}{_hex(z[:2]):<20}{'yes' if same else 'NO':<5} ({dt * 1e3:.0f} ms)")
        except Exception as exc:  # a backend that is present but broken is reported, not hidden
            print(f"    {name:<22}error: {type(exc).__name__}: {exc}")
    missing = [b for b in ("cpu", "triton", "cuda") if not any(n.startswith(b) for n, _ in available_backends(None))]
    if missing:
        print(f"    (not available here: {', '.join(missing)})")
    print()


def section_zo_steps(backend, device, steps=50, rank=8, eps=1e-3):
    """Toy quadratic f(theta) = 1/2 sum_j (a_j . theta - b_j)^2 with `rank` random unit directions a_j.

    Its curvature has rank `rank`, so ZO-SGD with lr ~ 1/(rank + 2) shrinks the loss by ~1/rank per step
    whatever the number of weights (a stand-in for the low effective rank of fine-tuning losses)."""
    params = make_params(torch.bfloat16, device)
    plan = mk.ZOPlan(params)
    numel = sum(t.numel() for _, t in params)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(rank, numel, generator=g)
    a = torch.linalg.qr(a.T).Q.T.contiguous().to(device)                   # orthonormal rows
    theta0 = torch.cat([t.reshape(-1).float() for _, t in params])
    b = a @ theta0 - 1e-3 * torch.randn(rank, generator=g).to(device)      # start 1e-3 away per direction

    def loss():
        theta = torch.cat([t.reshape(-1).float() for _, t in params])
        r = a @ theta - b
        return 0.5 * float((r.double() * r.double()).sum())

    lr = 1.0 / (rank + 2)
    print(f"(b) ZO-SGD on a toy quadratic: {numel} bf16 weights in {len(params)} tensors, backend={backend}, "
          f"eps={eps}, lr={lr:.3f}")
    print("    step: perturb_(+eps) -> loss+ ; perturb_(-eps, prior=+eps) -> loss- ; "
          "g = (loss+ - loss-) / 2eps ;")
    print("          update_([seed], [g], restore_seed=seed, prior=-eps, stochastic rounding)")
    t0 = time.perf_counter()
    history = [loss()]
    for step in range(steps):
        seed = 0x5EED_0000 + step
        mk.perturb_(plan, seed, eps, backend=backend)
        lp = loss()
        mk.perturb_(plan, seed, -eps, prior=eps, backend=backend)
        lm = loss()
        grad = (lp - lm) / (2 * eps)
        mk.update_(plan, [seed], [grad], lr=lr, restore_seed=seed, prior=-eps, sr_seed=step, backend=backend)
        history.append(loss())
    dt = time.perf_counter() - t0
    for step in list(range(0, steps + 1, 10)):
        bar = "#" * max(1, int(40 * history[step] / history[0]))
        print(f"    step {step:3d}  loss {history[step]:.3e}  {bar}")
    print(f"    loss {history[0]:.3e} -> {history[-1]:.3e} in {steps} steps ({dt / steps * 1e3:.0f} ms/step)")
    print()
    return history


def section_drift(backend, device, steps=200, n=1 << 14, eps=1e-3):
    print(f"(c) restore drift in bf16 after {steps} steps at lr=0, eps={eps}, {n} weights ~ N(0, 0.02^2)")
    g = torch.Generator().manual_seed(2)
    w0 = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).to(device)
    ours, mezo = w0.clone(), w0.clone()
    plan = mk.ZOPlan([("w", ours)])
    for s in range(steps):
        mk.perturb_(plan, s, eps, backend=backend)
        mk.perturb_(plan, s, -eps, prior=eps, backend=backend)
        mk.update_(plan, [s], [0.0], lr=0.0, restore_seed=s, prior=-eps, backend=backend)
        for c in (eps, -2 * eps, eps):                        # MeZO-style: regenerate z, add in place
            torch.manual_seed(s)
            z = torch.normal(0.0, 1.0, size=mezo.shape, dtype=mezo.dtype, device=device)
            mezo.add_(z, alpha=c)

    def rel(w):
        d = w.double() - w0.double()
        return 100 * float(d.pow(2).mean().sqrt() / w0.double().pow(2).mean().sqrt())

    def changed(w):
        return 100 * float((w.view(torch.int16) != w0.view(torch.int16)).double().mean())

    print(f"    {'':<12}{'RMS drift / weight RMS':>24}{'elements changed':>18}")
    print(f"    {'ours':<12}{rel(ours):>23.3f}%{changed(ours):>17.1f}%")
    print(f"    {'MeZO-style':<12}{rel(mezo):>23.3f}%{changed(mezo):>17.1f}%")
    print("    (ours loses bits only where theta + eps z lands in a coarser binade; see docs/NOISE_SPEC.md)")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", help="auto (default), reference, cpu, triton, cuda or fastest")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=50, help="ZO steps in (b)")
    p.add_argument("--drift-steps", type=int, default=200, help="steps in (c)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = _backends.resolve(args.backend, device)
    try:
        _backends.require(backend)
    except mk.BackendUnavailable as exc:
        if args.backend != "auto":
            raise
        print(f"note: {exc}\n      falling back to the pure-torch reference backend")
        backend, device = "reference", torch.device("cpu")
    print(f"mazo_kernels {mk.__version__}  noise spec v{mk.SPEC_VERSION}  torch {torch.__version__}  "
          f"device={device}  backend={backend}")
    if backend == "reference":
        print("(the C++ extension is not built: the reference backend is correct but slow; "
              "`pip install --no-build-isolation -e .` builds it)")
    print()
    t0 = time.perf_counter()
    section_noise()
    section_zo_steps(backend, device, steps=args.steps)
    section_drift(backend, device, steps=args.drift_steps)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
