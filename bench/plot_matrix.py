"""Plot the achieved fraction of the copy floor per case of bench_matrix.py's JSON (one PNG).

One panel per (model, op); bars per case (dtype / mask / distribution), one colour per backend; grey dots mark the
MeZO baseline of the same case (floor_ms / baseline_ms); lines at 1.0 (the floor) and at the 0.93 target.

    python bench/plot_matrix.py bench/results/h100_DATE/matrix_core.json -o bench/results/h100_DATE/matrix_core.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TARGET = 0.93
_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2, "none": 0, "threshold": 1, "bitmask": 2, "rowindex": 3, "gaussian": 0,
          "gaussian_fast": 1, "rademacher": 2}
COLOURS = {"cuda": "#1f77b4", "triton": "#ff7f0e", "cpu": "#2ca02c", "reference": "#9467bd"}
EXTRA = ["#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def series(r):
    """Bars are per backend, and per Triton variant where an experiment ran several."""
    return r["backend"] + (":" + r["variant"] if r.get("variant") else "")


def load(paths):
    heads, recs = [], []
    for p in paths:
        d = json.load(open(p))
        heads.append({k: v for k, v in d.items() if k != "records"})
        recs += [r for r in d["records"] if "error" not in r and r.get("ms")]
    return heads, recs


def plot(heads, recs, out, variant=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if variant is not None:
        recs = [r for r in recs if r.get("variant", "") == variant]
    if not recs:
        raise SystemExit("no successful records to plot")
    panels = sorted({(r["model"], r["op"]) for r in recs}, key=lambda k: (k[0] != "7b", k[0], k[1]))
    backends = [b for b in COLOURS if any(series(r) == b for r in recs)]
    backends += sorted({series(r) for r in recs} - set(backends))
    colours = dict(COLOURS)
    for b, c in zip([b for b in backends if b not in COLOURS], EXTRA * 4):
        colours[b] = c
    h = heads[0]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * max(
        len({(r["dtype"], r["mask"], r["distribution"]) for r in recs if (r["model"], r["op"]) == p})
        for p in panels) * len(backends) + 2), 3.2 * len(panels)), squeeze=False)
    for ax, (model, op) in zip(axes[:, 0], panels):
        rs = [r for r in recs if r["model"] == model and r["op"] == op]
        cases = sorted({(r["dtype"], r["mask"], r["distribution"]) for r in rs},
                       key=lambda c: tuple(_ORDER.get(v, 9) for v in c))
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            xs, ys = [], []
            for i, c in enumerate(cases):
                m = [r for r in rs if (r["dtype"], r["mask"], r["distribution"]) == c and series(r) == b]
                if m:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(m[0]["fraction_of_floor"])
            bars = ax.bar(xs, ys, width, color=colours[b], label=b)
            ax.bar_label(bars, labels=[f"{100 * y:.0f}" for y in ys], fontsize=6, padding=1)
        bx, by = [], []
        for i, c in enumerate(cases):
            m = [r for r in rs if (r["dtype"], r["mask"], r["distribution"]) == c and r.get("baseline_ms")]
            if m:
                bx.append(i)
                by.append(m[0]["floor_ms"] / m[0]["baseline_ms"])
        if bx:
            ax.scatter(bx, by, color="grey", marker="o", s=14, zorder=3, label="MeZO baseline")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(TARGET, color="red", lw=0.8, ls="--", label=f"target {TARGET:.2f}")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["\n".join(c) for c in cases], fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("fraction of floor")
        n = rs[0]["numel"]
        ax.set_title(f"{model} ({rs[0]['ntensors']} tensors, {n / 1e9:.2f} B elements): {op}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncol=len(backends) + 2)
    fig.suptitle(f"{h.get('device')} | torch {h.get('torch')} | triton {h.get('triton')} | CUDA {h.get('cuda')} | "
                 f"{h.get('date')} | copy {h.get('copy_bandwidth_TBps', 0):.2f} TB/s | commit "
                 f"{str(h.get('git_commit_as_run') or h.get('git_commit'))[:12]}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="matrix JSON files from bench_matrix.py")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: the first input with .png)")
    ap.add_argument("--variant", default=None, help="only records with this variant label")
    args = ap.parse_args(argv)
    heads, recs = load(args.inputs)
    plot(heads, recs, args.out or os.path.splitext(args.inputs[0])[0] + ".png", args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
