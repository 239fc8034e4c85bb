"""Markdown tables from bench_e2e.py JSON files; optionally rewrite README.md's end-to-end section (between
`<!-- e2e-table -->` and `<!-- /e2e-table -->`).

    python bench/make_e2e_table.py bench/results/e2e_run/e2e_*.json              # print
    python bench/make_e2e_table.py bench/results/e2e_run/e2e_*.json --readme README.md

Columns: step = median whole-step ms; 2 fwd = two forward+loss calls alone; passes = the step's passes over the
weights alone; rest = step - 2 fwd - passes; 1 pass = the step's first pass (theta + eps*z); ovh/pass =
(step - 2 fwd) / 1 pass (the issue's target for ZOSGD in place: <= 3.3); paired = the same from `--paired` runs
(the median over rounds of each step minus the two forwards timed just before it, so drift between the separate
loops cancels; "-" where the run did not pair them); x MeZO = the baseline's step time over this
method's (dense methods against `mezo`, MeZO as written; masked methods against their MeZO-style equivalent);
x in-place = against `mezo-inplace`; host = host time to issue one step (when it
approaches the step time, Python and launches bound the step); peak = peak allocated GiB during the steps (weights'
own GiB in brackets); run = the number of the row's source file in the Source list (one process each).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- e2e-table -->", "<!-- /e2e-table -->"
SHAPE_ORDER = ["7b", "13b", "30b", "1b", "125m", "tiny"]
BASELINE = {"zosgd": "mezo", "zosgd-transient": "mezo", "zosgd-lookahead": "mezo", "sparse-zosgd": "sparse-mezo", "mazo-zosgd": "mazo-mezo"}
H100_80GB_BYTES = 85017493504


def load(paths):
    docs = []
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        if d.get("format") != "mazo_kernels.bench_e2e":
            raise SystemExit(f"{p}: not a bench_e2e.py result (format {d.get('format')!r})")
        d["_path"] = p
        docs.append(d)
    rank = {s: i for i, s in enumerate(SHAPE_ORDER)}
    docs.sort(key=lambda d: (rank.get(d["header"]["model_shape"], 99), d["_path"]))
    return docs


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _gib(b):
    if b is None:
        return "-"
    return f"{b / 2**30:.1f}" if b >= 2**30 / 10 else f"{b / 2**30:.4f}"


def _rel(p):
    try:
        r = os.path.relpath(os.path.abspath(p), ROOT)
    except ValueError:
        return p
    return p if r.startswith("..") else r


def provenance(docs):
    seen, parts = set(), []
    for d in docs:
        h = d["header"]
        key = (h.get("device"), h.get("date", "")[:10], h.get("torch"), h.get("git_commit"),
               h.get("git_commit_as_run"))
        if key in seen:
            continue
        seen.add(key)
        # git_commit_as_run: a note in the file naming the code that ran where the device's git metadata lagged
        commit = h.get("git_commit_as_run") or ((h.get("git_commit") or "?")[:7] + ("+dirty" if h.get("git_dirty")
                                                                                      else ""))
        parts.append(f"{h.get('device')} ({h.get('date', '')[:10]}; torch {h.get('torch')}, triton "
                     f"{h.get('triton')}, transformers {h.get('transformers')}, CUDA {h.get('cuda')}, Python "
                     f"{h.get('python')}; commit `{commit}`)")
    return "; ".join(parts)


def main_table(docs):
    """One row per method and shape of every file; `run` numbers the file in the Source list (files from several
    processes and commits can hold the same method)."""
    lines = ["| model | batch x seq | method | step ms | 2 fwd ms | passes ms | rest ms | 1 pass ms | ovh/pass | "
             "paired | x MeZO | x in-place | host ms | peak GiB (weights) | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, d in enumerate(docs, 1):
        h = d["header"]
        for cfg in d["configs"]:
            ok = {r["method"]: r for r in cfg["results"] if r.get("status") == "ok"}
            for r in cfg["results"]:
                shape = f"{h['model_shape']} {h['dtype']}"
                bs = f"{cfg['batch']}x{cfg['seq']}"
                if r.get("status") != "ok":
                    why = r.get("status", "?")
                    lines.append(f"| {shape} | {bs} | `{r['method']}` | {why} | | | | | | | | | | | {run} |")
                    continue
                base = ok.get(BASELINE.get(r["method"], ""))
                inpl = ok.get("mezo-inplace") if r["method"] in ("zosgd", "zosgd-transient", "zosgd-lookahead") else None
                x_base = _f(base["step_ms"] / r["step_ms"]) if base else "-"
                x_inpl = _f(inpl["step_ms"] / r["step_ms"]) if inpl else "-"
                b = r["breakdown_ms"]
                lines.append(
                    f"| {shape} | {bs} | `{r['method']}`{_backend_tag(r)}{_dist_tag(r, h)} | {_f(r['step_ms'], 1)} | {_f(b['forwards'], 1)} | "
                    f"{_f(b['passes'], 1)} | {_f(b['rest'], 1)} | {_f(r['one_pass_ms'], 1)} | "
                    f"{_f(r['overhead_over_one_pass'])} | {_f((r.get('paired') or {}).get('overhead_over_one_pass'))} | "
                    f"{x_base} | {x_inpl} | {_f(r.get('host_ms'), 1)} | "
                    f"{_gib(r.get('mem_peak_step_bytes'))} ({_gib(h.get('weights_bytes'))}) | {run} |")
    return lines


def target_lines(docs):
    out = []
    for d in docs:
        for cfg in d["configs"]:
            for t in cfg.get("targets", []):
                # older files marked a negative overhead (forwards timed longer than the step) as met
                verdict = ("no measurement (the forwards, timed apart, took longer than the step)"
                           if t["value"] is not None and t["value"] < 0 else "met" if t["met"] else "not met")
                dist = d["header"].get("dist", "gaussian")
                tag = f" ({dist})" if dist != "gaussian" else ""
                out.append(f"- {d['header']['model_shape']} {cfg['batch']}x{cfg['seq']}{tag}: {t['what']} = "
                           f"{_f(t['value'])} (target {t['target']}): **{verdict}**")
    return out


def memory_lines(docs):
    out = []
    for d in docs:
        h = d["header"]
        if h["model_shape"] not in ("30b", "13b"):
            continue
        cap = h.get("memory", {}).get("allocator_cap_bytes")
        for cfg in d["configs"]:
            fits = cfg.get("fits_h100_80gb", {})
            for r in cfg["results"]:
                if r.get("status") != "ok":
                    out.append(f"- {h['model_shape']} {cfg['batch']}x{cfg['seq']} `{r['method']}`: {r.get('status')}"
                               + (" under the allocator cap" if cap else ""))
                    continue
                f = fits.get(r["method"], {})
                out.append(
                    f"- {h['model_shape']} {cfg['batch']}x{cfg['seq']} `{r['method']}`: step "
                    f"{_f(r['step_ms'], 1)} ms; weights {_gib(h['weights_bytes'])} GiB; peak allocated "
                    f"{_gib(r['mem_peak_step_bytes'])} GiB (forwards alone {_gib(r['mem_peak_forward_bytes'])}, "
                    f"passes alone {_gib(r['mem_peak_passes_bytes'])}); peak reserved + outside the allocator "
                    f"{_gib(f.get('peak_reserved_plus_outside_bytes'))} GiB of an H100 80GB's "
                    f"{_gib(H100_80GB_BYTES)}: {'fits' if f.get('fits_h100_80gb') else 'does not fit'}"
                    + (f" (run with the allocator capped at {_gib(cap)} GiB)" if cap else ""))
    return out


def _dist_tag(r, h):
    """Our methods' rows say which noise ran when it is not v1's Gaussian (MeZO's rows draw torch.normal anyway)."""
    dist = h.get("dist", "gaussian")
    mezo_style = "mezo" in r["method"] and "zosgd" not in r["method"]   # mezo*, sparse-mezo*, mazo-mezo*
    return f" ({dist})" if dist != "gaussian" and not mezo_style else ""


def _backend_tag(r):
    """ZOSGD rows say which kernels ran when it is not the default CUDA extension."""
    be = r.get("backend")
    return f" ({be})" if be not in (None, "cuda", "torch") else ""


def graph_lines(docs):
    out = []
    for d in docs:
        g = d.get("cuda_graph")
        if not g:
            continue
        r = g.get("result") or {}
        head = f"- {d['header']['model_shape']} {g.get('batch')}x{g.get('seq')}: "
        if g.get("error"):
            out.append(head + f"the experiment failed: {g['error'][:200]}")
            continue
        eager = (f"eager ZOSGD step {_f(r.get('eager_step_ms'))} ms (host {_f(r.get('eager_host_ms'))} ms), "
                 f"eager 2 forwards {_f(r.get('eager_fwd2_ms'))} ms, captured 2 forwards "
                 f"{_f(r.get('graph_fwd2_ms'))} ms")
        if r.get("capturable"):
            if "graph_speedup_vs_eager_step" in r:      # mk.GraphedZOStep: a replay is a training step
                out.append(head + eager + f"; `mk.GraphedZOStep` replay {_f(r.get('graph_step_ms'))} ms a step "
                           f"(host {_f(r.get('graph_host_ms'))} ms), {_f(r.get('graph_speedup_vs_eager_step'))}x the "
                           f"eager step; {r.get('steps_compared')} steps against eager ZOSGD from the same weights, "
                           f"losses, weights and logged gradients equal bit for bit: "
                           f"{r.get('replay_equals_eager_step')}.")
            else:
                out.append(head + eager + f"; captured step replay {_f(r.get('graph_step_ms'))} ms, replay equals "
                           f"the eager step bit for bit: {r.get('replay_equals_eager_step')}. A replay repeats the "
                           "captured seeds (timing proxy, not a training loop).")
        else:
            errs = "; ".join(f"{a.get('capture_error_mode', a.get('how', ''))}: {a.get('error', '')[:160]}"
                             for a in r.get("attempts", []))
            out.append(head + eager + f"; the step could not be captured ({errs})")
    return out


def render(docs):
    srcs = ", ".join(f"({i}) `{_rel(d['_path'])}`" for i, d in enumerate(docs, 1))
    how = "CUDA events" if all(d["header"].get("cuda") for d in docs) else "CUDA events on a GPU, perf_counter on a CPU"
    lines = [f"Measured on {provenance(docs)}. Random-init LLaMA-shaped `LlamaForCausalLM`, causal-LM loss on fixed "
             f"random token ids; median of the timed repetitions ({how}). Source: " + srcs +
             ", regenerated by `bench/make_e2e_table.py`.", ""]
    lines += main_table(docs)
    for title, extra in (("Targets (issue 5)", target_lines(docs)), ("Memory", memory_lines(docs)),
                         ("CUDA graph", graph_lines(docs))):
        if extra:
            lines += ["", f"{title}:", ""] + extra
    return "\n".join(lines)


def update_readme(path, text):
    with open(path) as f:
        s = f.read()
    i, j = s.find(BEGIN), s.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{path}: markers {BEGIN} ... {END} not found")
    s = s[:i + len(BEGIN)] + "\n" + text + "\n" + s[j:]
    with open(path, "w") as f:
        f.write(s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="bench_e2e.py JSON files")
    ap.add_argument("--readme", default=None, help="rewrite this file's e2e section")
    args = ap.parse_args(argv)
    text = render(load(args.files))
    if args.readme:
        update_readme(args.readme, text)
        print(f"updated {args.readme}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
