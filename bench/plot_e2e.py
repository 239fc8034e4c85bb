"""Stacked bars of the end-to-end step time (forwards / passes / rest) per method, one panel per model and batch
shape, from bench_e2e.py JSON files.

    python bench/plot_e2e.py bench/results/e2e_run/e2e_*.json --out bench/results/e2e_run/e2e.png

Each bar is one method's median step; its segments are the two forwards alone, the step's passes over the weights
alone, and the rest (step - forwards - passes: Python, launches, MeZO's .item(), the allocator). A negative rest (the
separately timed parts ran slower than inside the step) is drawn as zero and marked with '*'. The number above a bar
is the step in ms (also drawn as a black line) and, for ZOSGD methods, its speedup against the MeZO-style baseline of the same panel. A CUDA-graph
result (bench_e2e.py --cuda-graph) adds a bar "zosgd graph": the captured step's replay, split into the captured two
forwards and the remainder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

BASELINE = {"zosgd": "mezo", "zosgd-transient": "mezo", "sparse-zosgd": "sparse-mezo", "mazo-zosgd": "mazo-mezo"}
COLORS = {"forwards": "#4C72B0", "passes": "#DD8452", "rest": "#8C8C8C"}
SHAPE_ORDER = ["7b", "13b", "30b", "1b", "125m", "tiny"]


def panels(paths):
    out = []
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        if d.get("format") != "mazo_kernels.bench_e2e":
            raise SystemExit(f"{p}: not a bench_e2e.py result")
        h = d["header"]
        graph = d.get("cuda_graph") or {}
        gres = graph.get("result") or {}
        for cfg in d["configs"]:
            bars = []
            for r in cfg["results"]:
                if r.get("status") != "ok":
                    bars.append({"method": r["method"], "status": r.get("status")})
                    continue
                b = r["breakdown_ms"]
                bars.append({"method": r["method"], "status": "ok", "step": r["step_ms"], "forwards": b["forwards"],
                             "passes": b["passes"], "rest": b["rest"]})
            if (gres.get("capturable") and gres.get("graph_step_ms") is not None
                    and (graph.get("batch"), graph.get("seq")) == (cfg["batch"], cfg["seq"])):
                fw = gres.get("graph_fwd2_ms") or 0.0
                bars.append({"method": "zosgd graph", "status": "ok", "step": gres["graph_step_ms"], "forwards": fw,
                             "passes": 0.0, "rest": gres["graph_step_ms"] - fw, "graph": True})
            if bars:
                out.append({"title": f"{h['model_shape']} {h['dtype']}, batch {cfg['batch']} x {cfg['seq']}",
                            "shape": h["model_shape"], "bars": bars, "device": h.get("device"),
                            "date": (h.get("date") or "")[:10]})
    rank = {s: i for i, s in enumerate(SHAPE_ORDER)}
    out.sort(key=lambda q: rank.get(q["shape"], 99))
    return out


def draw(pans, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(pans)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    width = max(len(p["bars"]) for p in pans)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * max(6.0, 0.8 * width + 2), nrows * 4.2), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, p in zip(axes.flat, pans):
        names = [b["method"] for b in p["bars"]]
        steps = {b["method"]: b.get("step") for b in p["bars"]}
        x = range(len(names))
        top = max([b.get("step") or 0 for b in p["bars"]] + [1e-9])
        for i, b in enumerate(p["bars"]):
            if b["status"] != "ok":
                ax.text(i, 0.02 * top, b["status"], ha="center", va="bottom", rotation=90, fontsize=8)
                continue
            bottom = 0.0
            for seg in ("forwards", "passes", "rest"):
                v = max(0.0, b[seg])
                ax.bar(i, v, bottom=bottom, color=COLORS[seg], hatch="//" if b.get("graph") and seg == "rest" else None,
                       label=seg if i == 0 else None, edgecolor="white", linewidth=0.5)
                bottom += v
            ax.plot([i - 0.4, i + 0.4], [b["step"], b["step"]], color="black", linewidth=1.0)   # the step itself
            label = f"{b['step']:.1f}" + ("*" if b["rest"] < 0 else "")
            base = steps.get(BASELINE.get(b["method"], ""))
            if base:
                label += f"\nx{base / b['step']:.2f}"
            ax.text(i, max(bottom, b["step"]) + 0.01 * top, label, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(p["title"], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    names = {"forwards": "2 forwards", "passes": "passes over the weights", "rest": "rest"}
    axes.flat[0].legend(handles, [names[x] for x in labels], loc="upper left", fontsize=7, ncol=3, framealpha=0.8)
    devs = sorted({f"{p['device']} {p['date']}" for p in pans})
    fig.suptitle("ZO step time breakdown (x: speedup over the MeZO-style baseline; *: rest < 0 drawn as 0)\n"
                 + "; ".join(devs), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="e2e.png")
    args = ap.parse_args(argv)
    pans = panels(args.files)
    if not pans:
        raise SystemExit("no results to plot")
    draw(pans, args.out)
    print(f"wrote {args.out} ({len(pans)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
