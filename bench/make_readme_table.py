"""Regenerate the speed table in README.md (between `<!-- bench-table -->` and `<!-- /bench-table -->`) from
bench_matrix.py JSON files in bench/results/.

By default the newest matrix_core.json under bench/results/ (by the date and time in its header) and its records
without a variant label; the table pivots the backends into columns. Several --input files (one run split over
device calls, e.g. a full matrix by dtype) are merged: their headers are listed and must name the same device.

    python bench/make_readme_table.py                                     # rewrite README.md
    python bench/make_readme_table.py --input F [F ...] --print           # print the table only
    python bench/make_readme_table.py --input F G --models 7b --masked-dtypes bf16   # fewer rows
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench-table -->", "<!-- /bench-table -->"
ORDER = {"op": ["perturb_", "perturb_prior", "update_", "update_next", "perturbed_copy", "update0"], "dtype": ["bf16", "fp16", "fp32"],
         "mask": ["none", "threshold", "bitmask", "rowindex"], "distribution": ["gaussian", "gaussian_fast", "rademacher"],
         "model": ["7b", "125m", "1t", "tiny"]}


def newest(pattern):
    best = None
    for p in glob.glob(os.path.join(ROOT, "bench", "results", "**", pattern), recursive=True):
        try:
            h = json.load(open(p))
        except (OSError, ValueError):
            continue
        key = (h.get("date", ""), h.get("time", ""), p)
        if best is None or key > best[0]:
            best = (key, p)
    return best[1] if best else None


def _rank(field, v):
    o = ORDER.get(field, [])
    return o.index(v) if v in o else len(o)


def commit_of(d):
    """The commit whose code ran: `git_commit_as_run` where a note in the file corrects `git_commit` (the device
    copy's git metadata can lag the working tree it runs)."""
    return d.get("git_commit_as_run") or d.get("git_commit")


def load(paths):
    """Merge matrix files into one document: the first header, every file's records, and `_sources` (path, commit,
    date of each)."""
    docs = []
    for p in paths:
        d = json.load(open(p))
        d["_path"] = os.path.abspath(p)
        docs.append(d)
    devices = {d.get("device") for d in docs}
    if len(devices) > 1:
        raise SystemExit(f"the inputs were measured on different devices {sorted(map(str, devices))}: one table "
                         "compares one device")
    merged = dict(docs[0])
    merged["records"] = [r for d in docs for r in d["records"]]
    merged["_sources"] = [(d["_path"], commit_of(d), d.get("date"), d.get("copy_bandwidth_TBps", 0)) for d in docs]
    return merged


def table(d, variant="", models=None, masked_dtypes=None):
    """models: keep these models (None: all); masked_dtypes: masked rows only for these dtypes (None: all)."""
    recs = [r for r in d["records"] if r.get("variant", "") == variant
            and (models is None or r["model"] in models)
            and (masked_dtypes is None or r["mask"] == "none" or r["dtype"] in masked_dtypes)]
    backends = [b for b in ("cuda", "triton", "cpu", "reference") if any(r["backend"] == b for r in recs)]
    keys = sorted({(r["model"], r["op"], r["dtype"], r["mask"], r["distribution"]) for r in recs},
                  key=lambda k: tuple(_rank(f, v) for f, v in zip(("model", "op", "dtype", "mask", "distribution"),
                                                                  k)))
    by = {(r["model"], r["op"], r["dtype"], r["mask"], r["distribution"], r["backend"]): r for r in recs}
    # the MeZO column: the last input that timed the baseline for this case (a file run with --no-baselines has none)
    mezo = {(r["model"], r["op"], r["dtype"], r["mask"], r["distribution"]): r["baseline_ms"] for r in recs
            if r.get("baseline_ms")}
    sources = d.get("_sources") or [(d["_path"], commit_of(d), d.get("date"), d.get("copy_bandwidth_TBps", 0))]
    commits = ", ".join(sorted({f"`{c}`" for _, c, _, _ in sources}))
    floors = ", ".join(f"{bw:.2f}" for _, _, _, bw in sources)
    lines = [
        f"Measured on {d.get('device')} ({d.get('date')}; torch {d.get('torch')}, triton {d.get('triton')}, "
        f"CUDA {d.get('cuda')}, Python {d.get('python')}; commit {commits}). Copy floor "
        f"{floors} TB/s (bytes read + written; each file measures its own). Each cell: median ms of one pass over "
        "the whole parameter list as one plan, and its fraction of the floor (the pass's bytes / copy bandwidth; "
        "masks select half of the elements, their own bytes included). MeZO: the per-parameter `torch.normal` + "
        "`p.add_` baseline (masked cases: Sparse-MeZO style, the mask materialised); `update_` is restore + "
        "update with stochastic rounding (MeZO: two passes); `perturb_prior` is the step's second pass (restore the "
        "prior perturbation exactly, perturb the other way); `update0` is `update_` with prior 0 (the transient mode's "
        "update); `update_next` is `update_` and the next step's +eps pass in one (op 3, `ZOSGD(lookahead=True)`; "
        "MeZO: three passes). Source: "
        + ", ".join(f"`{os.path.relpath(p, ROOT)}`" for p, _, _, _ in sources)
        + ", regenerated by `bench/make_readme_table.py`.",
        "",
        "| model | op | dtype | mask | noise | " + " | ".join(backends) + " | floor ms | MeZO ms | extra bytes (" +
        ", ".join(backends) + ") |",
        "|---|---|---|---|---|" + "---|" * len(backends) + "---|---|---|",
    ]
    for k in keys:
        cells = []
        extra = []
        floor = base = None
        for b in backends:
            r = by.get(k + (b,))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['ms']:.2f} ({100 * r['fraction_of_floor']:.0f}%)")
                floor, base = r["floor_ms"], r.get("baseline_ms") or mezo.get(k)
                extra.append(str(r.get("extra_bytes")))
        model, op, dt, mask, dist = k
        ex = ", ".join(extra) if extra else "-"
        lines.append(f"| {model} | `{op}` | {dt} | {mask} | {dist} | " + " | ".join(cells) +
                     f" | {floor:.2f} | " + (f"{base:.1f}" if base else "-") + f" | {ex} |"
                     if floor is not None else f"| {model} | `{op}` | {dt} | {mask} | {dist} | " +
                     " | ".join(cells) + " | - | - | - |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", help="matrix JSON files, merged (default: the newest "
                                               "bench/results/**/matrix_core.json)")
    ap.add_argument("--models", help="comma list of models to keep (default: all)")
    ap.add_argument("--masked-dtypes", help="comma list: masked rows only for these dtypes (default: all)")
    ap.add_argument("--variant", default="", help="records with this variant label (default: none)")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--print", action="store_true", help="print the table instead of rewriting the README")
    args = ap.parse_args(argv)
    paths = args.input or [newest("matrix_core.json")]
    if not paths[0]:
        raise SystemExit("no matrix_core.json under bench/results/; run bench/bench_matrix.py first or pass --input")
    d = load(paths)
    t = table(d, args.variant, models=args.models.split(",") if args.models else None,
              masked_dtypes=args.masked_dtypes.split(",") if args.masked_dtypes else None)
    if args.print:
        print(t)
        return 0
    text = open(args.readme).read()
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pat.search(text):
        raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} markers")
    open(args.readme, "w").write(pat.sub(lambda _: f"{BEGIN}\n{t}\n{END}", text))
    print(f"updated {args.readme} from " + ", ".join(os.path.relpath(p, ROOT) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
