"""Summarise bench/profile_cases.py under Nsight Compute (gpu_check.sh NCU=1): one row per profiled zo_apply_ launch.

    python bench/summarize_ncu.py ncu.csv --numel 268435456 --floor-ms 0.2527

Instructions per element = executed warp instructions x 32 / elements. The issue budget per element at the copy
floor is what the SMs can issue in that time: SMs x 4 schedulers x clock x floor / elements x 32 (--sms, --ghz)."""
import argparse
import collections
import csv
import io

WANT = ["Duration", "DRAM Throughput", "Compute (SM) Throughput", "Issue Slots Busy", "Executed Instructions",
        "Registers Per Thread", "Achieved Occupancy", "Warp Cycles Per Issued Instruction"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--floor-ms", type=float, default=None, help="copy floor of one pass, ms")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--ghz", type=float, default=1.98)
    ap.add_argument("--min-us", type=float, default=50.0, help="skip launches shorter than this (guards, fills)")
    args = ap.parse_args()
    lines = [ln for ln in open(args.csv) if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("".join(lines))))
    ix = {h: i for i, h in enumerate(rows[0])}
    kernels = collections.OrderedDict()
    for r in rows[1:]:
        k = (int(r[ix["ID"]]), r[ix["Kernel Name"]].split("(")[0].replace("void ", "").replace("<unnamed>::", ""))
        kernels.setdefault(k, {})[r[ix["Metric Name"]]] = r[ix["Metric Value"]].replace(",", "")
    print("| id | kernel | us | DRAM % | SM issue busy % | instr/elem | regs | occupancy % | cycles/issue |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (i, name), m in kernels.items():
        us = float(m.get("Duration", 0)) / 1000.0   # ns
        if us < args.min_us:
            continue
        ipe = float(m["Executed Instructions"]) * 32 / args.numel
        g = lambda k: m.get(k, "-")   # noqa: E731 -- a section left out of the profile leaves its columns empty
        print(f"| {i} | `{name}` | {us:.0f} | {g('DRAM Throughput')} | {g('Issue Slots Busy')} | {ipe:.1f} | "
              f"{g('Registers Per Thread')} | {g('Achieved Occupancy')} | {g('Warp Cycles Per Issued Instruction')} |")
    stall = "smsp__average_warps_issue_stalled_"
    if any(k.startswith(stall) for m in kernels.values() for k in m):
        # where a warp waits, in warps per issued instruction (their sum is "cycles/issue" above), and the busiest
        # pipes: the profile's raw metrics (gpu_check.sh NCU=1 asks for them)
        print("\n| id | kernel | top stall reasons (warps per issue) | busiest pipes (% of peak) |")
        print("|---|---|---|---|")
        for (i, name), m in kernels.items():
            if float(m.get("Duration", 0)) / 1000.0 < args.min_us:
                continue
            st = sorted(((k[len(stall):].replace("_per_issue_active.ratio", ""), float(v)) for k, v in m.items()
                         if k.startswith(stall) and k.endswith("_per_issue_active.ratio")), key=lambda kv: -kv[1])
            pipes = sorted(((k.replace("sm__inst_executed_pipe_", "").replace(".avg.pct_of_peak_sustained_active", ""),
                             float(v)) for k, v in m.items() if k.startswith("sm__inst_executed_pipe_")),
                           key=lambda kv: -kv[1])
            print(f"| {i} | `{name[-70:]}` | " + ", ".join(f"{k} {v:.2f}" for k, v in st[:6] if v > 0) + " | "
                  + ", ".join(f"{k} {v:.0f}" for k, v in pipes[:5]) + " |")
    if args.floor_ms:
        budget = args.sms * 4 * args.ghz * 1e9 * args.floor_ms * 1e-3 * 32 / args.numel
        print(f"\nIssue budget at the floor: {budget:.1f} lane-instructions per element "
              f"({args.sms} SMs x 4 schedulers x {args.ghz} GHz x {args.floor_ms} ms / {args.numel} elements)")


if __name__ == "__main__":
    main()
