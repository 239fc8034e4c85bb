"""Train a tiny random LLaMA for a few ZOSGD steps on the GPU and keep what replay needs to rebuild it elsewhere.

    python bench/gpu_seedlog.py [--out DIR] [--steps 20] [--device cuda] [--backend auto]

For each configuration (fp32 in place with param groups; bf16 in place, two directions per step; bf16 transient
with tied embeddings, one-sided Rademacher) it writes DIR/<config>/initial.pt and final.pt (the trained tensors,
torch.save of {name: tensor} on CPU), seed_log.json (the optimizer's seed log: seeds as integers, projected
gradients as float32 bit patterns) and DIR/meta.json (versions, device, date, backend). On CUDA it also checks that
a ZOSGD step issues no host synchronisation (torch.cuda.set_sync_debug_mode("error") around steps of a plain model).

python_tests/test_replay.py replays every configuration found under bench/results/gpu_seedlog/ on the CPU and
asserts bit-equality with final.pt; without that directory it runs the same configurations here (reference
backend) and replays them with the C++ CPU backend. Files stay small (a ~23 k-parameter model).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

try:
    import mazo_kernels as mk
except ImportError:     # run from a checkout without installing: the package is beside bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mazo_kernels as mk

VOCAB = 64
CONFIGS = {
    "fp32_inplace": dict(dtype="float32", tie=False, mode="inplace", estimator="two_sided", dist="gaussian", q=1,
                         lr=1e-3, eps=1e-3, wd=0.01, seed=101),
    "bf16_inplace_q2": dict(dtype="bfloat16", tie=False, mode="inplace", estimator="two_sided", dist="gaussian", q=2,
                            lr=1e-3, eps=1e-3, wd=0.0, seed=202),
    "bf16_transient_tied": dict(dtype="bfloat16", tie=True, mode="transient", estimator="one_sided",
                                dist="rademacher", q=1, lr=2e-4, eps=1e-3, wd=0.01, seed=303),
}


def build_model(dtype: torch.dtype, tie: bool, seed: int = 0):
    """Random-init tiny LLaMA; created on the CPU under a fixed torch seed, so the init is the same everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def batch(device, n: int = 8, length: int = 16):
    """Counting sequences (next token = current + 1 mod the vocabulary): learnable, fixed."""
    g = torch.Generator().manual_seed(7)
    start = torch.randint(4, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(length)) % (VOCAB - 4) + 4
    return ids.to(device)


def param_groups(model, cfg):
    """Matrices decay, norm weights do not; norms also get a smaller eps (exercises per-group eps)."""
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg["wd"]},
            {"params": no_decay, "weight_decay": 0.0, "eps": cfg["eps"] / 2, "lr": cfg["lr"] * 2}]


def trained_tensors(opt):
    return {e.name: e.tensor.detach().cpu().clone() for e in opt.plan.entries}


def run(name: str, cfg: dict, device: str, backend: str, steps: int, out_dir: str) -> dict:
    dtype = getattr(torch, cfg["dtype"])
    model = build_model(dtype, cfg["tie"]).to(device)
    ids = batch(device)
    opt = mk.ZOSGD(param_groups(model, cfg), lr=cfg["lr"], eps=cfg["eps"], dist=cfg["dist"],
                   estimator=cfg["estimator"], num_perturbations=cfg["q"], mode=cfg["mode"], module=model,
                   seed=cfg["seed"], backend=backend)
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    torch.save(trained_tensors(opt), os.path.join(d, "initial.pt"))

    def closure():
        return model(input_ids=ids, labels=ids).loss

    losses = [opt.step(closure) for _ in range(steps)]
    torch.save(trained_tensors(opt), os.path.join(d, "final.pt"))
    opt.seed_log.to_json(os.path.join(d, "seed_log.json"))
    losses = [float(x) for x in losses]
    return {"backend": opt.backend, "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
            "skipped": sum(r["skipped"] for r in opt.seed_log.steps), "config": cfg}


def sync_check(device: str, backend: str, steps: int = 5) -> dict:
    """Steps of a plain model (whose forward has no synchronising op) under sync-debug mode "error"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(device)
    model = model.to(torch.bfloat16)
    x = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-3, module=model, backend=backend)

    def closure():
        return model(x).float().pow(2).mean()

    opt.step(closure)              # first step: lazy initialisations outside the check
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(steps):
            opt.step(closure)
        return {"sync_free": True, "steps": steps}
    except RuntimeError as exc:
        return {"sync_free": False, "error": str(exc)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "mazo_kernels": mk.__version__,
           "spec_version": mk.SPEC_VERSION, "device": device}
    for mod in ("transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:   # the commit of the checkout, and whether the tree differed from it (then the commit is only a hint)
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        env["git_commit"] = git("rev-parse", "HEAD")
        env["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = env["git_dirty"] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu_seedlog")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    meta = environment(args.device)
    meta["runs"] = {}
    for name, cfg in CONFIGS.items():
        meta["runs"][name] = run(name, cfg, args.device, args.backend, args.steps, args.out)
        print(name, json.dumps(meta["runs"][name]))
    if args.device.startswith("cuda"):
        meta["sync_check"] = sync_check(args.device, args.backend)
        print("sync_check", meta["sync_check"])
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
