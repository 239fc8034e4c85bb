"""Offline instruction counts of the Triton fast kernel (no GPU needed): compile it for sm_90, disassemble the cubin
and count SASS instructions per element, registers and spills, per (op, distribution, dtype, prior, rounding).

    python bench/sass_count.py [--cases core|all] [--cuda] [--out bench/results/offline_sass/sass_counts.json]

Why: the Gaussian passes are issue-bound on an H100/H200 (bench/NOTES.md, "The profiler's view"), so the SASS count
of the fast path predicts their speed: the H200 issues ~31.5 lane-instructions per element at the copy floor
(132 SMs x 4 schedulers x 1.98 GHz over 4 bytes per bf16 element at 4.2 TB/s); Nsight Compute measured the schedulers
busy ~79% of cycles in these kernels. The fast kernel (MODE 3, FAST_BLOCK elements per program, FAST_NUM_WARPS warps)
is straight-line code apart from the density test and its one-iteration loop, so its static count divided by the
elements per thread is the executed count per element (Nsight measured 53.1 for perturb_ Gaussian bf16 where this
count gives 56, session 4). Needs triton's bundled nvdisasm / cuobjdump (triton/backends/nvidia/bin).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mazo_kernels import triton_kernels as tk  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIGNATURE = {"tab_ptr": "*i64", "prog_ptr": "*i64", "meta_ptr": "*i64", "fv_ptr": "*fp32", "call_ptr": "*i64",
             "gs_ptr": "*fp32", "n_seeds": "i32"}
DTS = {"fp32": 0, "fp16": 1, "bf16": 2}


def cases(which: str):
    """(label, constexprs). OP 0 perturb_, 1 update_, 2 perturbed_copy; DIST 0 Gaussian, 1 Rademacher, 2 gaussian_fast."""
    out = []
    dts = ("bf16",) if which == "core" else tuple(DTS)
    for dt in dts:
        for dist, dname in ((0, "gaussian"), (1, "rademacher"), (2, "gaussian_fast")):
            out.append((f"perturb_ {dname} {dt}", dict(OP=0, DIST=dist, SR=0, DT=DTS[dt], HAS_PRIOR=False, REUSE0=0,
                                                         NSTAT=0)))
            out.append((f"perturb_ {dname} {dt} restore", dict(OP=0, DIST=dist, SR=0, DT=DTS[dt], HAS_PRIOR=True,
                                                                 REUSE0=0, NSTAT=0)))
            out.append((f"update_ {dname} {dt} restore+SR", dict(OP=1, DIST=dist, SR=1, DT=DTS[dt], HAS_PRIOR=True,
                                                                   REUSE0=1, NSTAT=2)))
            # threshold / packed-bit masks in the fast kernel (MASKED): the latch written by the first pass, read
            # by the restoring ones (the mask kind is a run-time value, so both store forms are in the code)
            out.append((f"perturb_ {dname} {dt} masked, latch write", dict(OP=0, DIST=dist, SR=0, DT=DTS[dt],
                        HAS_PRIOR=False, REUSE0=0, NSTAT=0, TMODE=1, MASKED=True)))
            out.append((f"perturb_ {dname} {dt} masked restore", dict(OP=0, DIST=dist, SR=0, DT=DTS[dt],
                        HAS_PRIOR=True, REUSE0=0, NSTAT=0, TMODE=2, MASKED=True)))
            out.append((f"update_ {dname} {dt} masked restore+SR", dict(OP=1, DIST=dist, SR=1, DT=DTS[dt],
                        HAS_PRIOR=True, REUSE0=1, NSTAT=2, TMODE=2, MASKED=True)))
    # the restoring passes as the host launches them for shifts below small_shift's bound (every ZO step's)
    out += [(label + ", small shift", dict(c, SMALL=True)) for label, c in list(out)
            if c["HAS_PRIOR"] and c["DT"] in (1, 2)]
    return out


def fp32_tile_cases():
    """Masked fp32 in both fast-path tiles (ROW_THREAD False: [R, 8], True: [2, R, 4]): the shared-memory exchange
    (BAR / STS / LDS / SHFL) and the instructions of each pass (bench/NOTES.md, session 20)."""
    passes = (("perturb_ (latch write)", dict(OP=0, SR=0, HAS_PRIOR=False, REUSE0=0, NSTAT=0, TMODE=1)),
              ("perturb_prior", dict(OP=0, SR=0, HAS_PRIOR=True, REUSE0=0, NSTAT=0, TMODE=2)),
              ("update_", dict(OP=1, SR=1, HAS_PRIOR=True, REUSE0=1, NSTAT=2, TMODE=2)),
              ("update_next", dict(OP=3, SR=1, HAS_PRIOR=True, REUSE0=1, NSTAT=3, TMODE=2)),
              ("perturbed_copy", dict(OP=2, SR=0, HAS_PRIOR=False, REUSE0=0, NSTAT=0, TMODE=0)))
    out = []
    for dist, dname in ((0, "gaussian"), (1, "rademacher"), (2, "gaussian_fast")):
        for rowidx in (False, True):
            for pname, c in passes:
                for rt in (False, True):
                    label = f"fp32 {dname} {pname}{' row-index' if rowidx else ''} {'[2,R,4]' if rt else '[R,8]'}"
                    out.append((label, dict(c, DIST=dist, DT=0, MASKED=True, ROWIDX=rowidx, ROW_THREAD=rt,
                                            RAD8=dist == 1 and c["OP"] == 0 and not c["HAS_PRIOR"])))
    return out


def rowidx_cases():
    """16-bit row-index element units (ROWIDX: each unit of 8 finds its selection by a search of its row's entries)
    in every pass and noise, bf16: their registers and occupancy (bench/NOTES.md, session 22); MAZO_TRITON_ROWIDX_SCATTER
    =1 compiles the scatter form (session 24), its search MAZO_TRITON_ROWIDX_PROBES (session 25)."""
    passes = (("perturb_", dict(OP=0, SR=0, HAS_PRIOR=False, REUSE0=0, NSTAT=0)),
              ("perturb_prior", dict(OP=0, SR=0, HAS_PRIOR=True, REUSE0=0, NSTAT=0)),
              ("update_", dict(OP=1, SR=1, HAS_PRIOR=True, REUSE0=1, NSTAT=2)),
              ("update_next", dict(OP=3, SR=1, HAS_PRIOR=True, REUSE0=1, NSTAT=3)),
              ("perturbed_copy", dict(OP=2, SR=0, HAS_PRIOR=False, REUSE0=0, NSTAT=0)))
    out = []
    for dist, dname in ((0, "gaussian"), (1, "rademacher"), (2, "gaussian_fast")):
        for pname, c in passes:
            c = dict(c, DIST=dist, DT=2, MASKED=True, ROWIDX=True, TMODE=0)
            masked, _, _, op, prior = _host_args(c)
            out.append((f"bf16 {dname} {pname} row-index", dict(c, RAD8=tk._rad8_choice(masked, dist, op, prior, True),
                                                                 ROWIDX_SCATTER=bool(tk.ROWIDX_SCATTER),
                                                                 PROBES=int(tk.ROWIDX_PROBES) if tk.ROWIDX_SCATTER
                                                                 else 0, FIRST_LATE=bool(tk.ROWIDX_FIRST_LATE))))
    return out


def _host_args(c) -> tuple:
    """(masked, dtype, dist, op, prior) as the host's policy functions take them, from the kernel's constexprs (the
    16-bit types share every policy, so DT 1 and 2 both read as bfloat16)."""
    return (bool(c.get("MASKED")), torch.float32 if c["DT"] == 0 else torch.bfloat16, c["DIST"], c["OP"],
            1.0 if c["HAS_PRIOR"] else 0.0)


def host_warps(consts) -> int:
    """The fast kernel's warps as zo_apply_ launches these constexprs (masked perturb_ with prior 0: more)."""
    return int(tk._fast_warps(*_host_args(consts), bool(consts.get("RAD8"))))


def host_maxnreg(consts) -> int:
    """The fast kernel's register cap as zo_apply_ compiles these constexprs (0: none; tk._fast_maxnreg)."""
    return int(tk._fast_maxnreg(*_host_args(consts), bool(consts.get("ROWIDX"))))


def compile_fast(consts: dict, num_warps: int, fblock: int, block: int, maxnreg: int = 0):
    c = dict(TMODE=0, MASKED=False, ROWIDX=False, SMALL=False, RAD8=False, ROWIDX_SCATTER=False, PROBES=0, FIRST_LATE=False, MODE=3,
             FBLOCK=fblock, BLOCK=block, NTAB=tk._NTAB)
    c.update(consts)
    if "ROW_THREAD" not in consts:   # the host's choice (zo_apply_)
        c["ROW_THREAD"] = tk._row_thread_choice(*_host_args(c), bool(c["RAD8"]))
    if "ASM" not in consts:   # the host's choice (zo_apply_): MAZO_TRITON_ASM=0/1/2 compares the forms
        c["ASM"] = int(tk.ASM) if c["DT"] == 2 and tk.HW_BF16 else 0
    sig = dict(SIGNATURE)
    sig.update({k: "constexpr" for k in c})
    src = triton.compiler.ASTSource(fn=tk._zo_kernel, signature=sig, constexprs=c)
    opts = {"num_warps": num_warps, "enable_fp_fusion": False}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass_stats(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    instr = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", ln)]
    ops = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", ln).split()[0].rstrip(";") for ln in instr]
    ops = [o for o in ops if o != "NOP"]
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    by_class = {}
    for o in ops:
        k = o.split(".")[0]
        by_class[k] = by_class.get(k, 0) + 1
    alu = sum(n for k, n in by_class.items() if k in ALU_OPCODES)
    exchange = {k: by_class.get(k, 0) for k in ("BAR", "STS", "LDS", "SHFL")}
    return {"instructions": len(ops), "alu_instructions": alu, "exchange": exchange,
            "registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None,
            "top_opcodes": dict(sorted(by_class.items(), key=lambda kv: -kv[1])[:int(os.environ.get("TOPN", 12))])}


# Opcodes that run on the ALU pipe of an sm_90 SM sub-partition (16 lanes: a warp instruction every other cycle).
# Nsight Compute's pipe counters on the restoring passes (bench/NOTES.md, session 15) put this pipe at 65-76% of its
# peak: with about half of the instructions on it, it fills about when issue does, and it is the limit where more
# than half are (predicted_fraction_alu_bound; the issue model still predicts Triton's passes better).
# IMAD, FFMA, FADD, FMUL go to the FMA pipes; MUFU and scalar F2F to XU; U* to the uniform datapath.
ALU_OPCODES = frozenset({"LOP3", "ISETP", "FSETP", "SEL", "FSEL", "PRMT", "IADD3", "SHF", "LEA", "PLOP3", "IMNMX",
                         "FMNMX", "VIADD", "F2FP", "I2FP", "P2R", "R2P", "VIMNMX"})


def _ptxas_v(src: str, cuda_home: str, incs: list) -> str:
    """nvcc -Xptxas -v of one CUDA source for sm_90 with the build's flags; returns ptxas's report."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-cubin", "-o", os.path.join(tmp, "k.cubin"),
               src, "-O3", "--fmad=false", "--prec-div=true", "--prec-sqrt=true",
               "--ftz=false", "-std=c++20", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C_cuda", "-Xptxas", "-v"]
        cmd += [f"-I{i}" for i in incs]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stderr


def cuda_kernels(cuda_home: str) -> list:
    """ptxas -v of the CUDA kernel families (csrc/zo_cuda_k_*.cu) for sm_90 (the build's flags): registers and spills
    per kernel instantiation. Static counts of the CUDA kernel are not per-element figures (one kernel holds every mask path), so
    only the register budget is reported: it sets the warps per SM that hide the loads' latency."""
    import sysconfig
    from torch.utils import cpp_extension
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    incs = [os.path.join(root, "csrc")] + cpp_extension.include_paths() + [os.path.join(cuda_home, "include"),
                                                                          sysconfig.get_paths()["include"]]
    stderr = ""
    for src in sorted(glob.glob(os.path.join(root, "csrc", "zo_cuda_k_*.cu"))):
        stderr += _ptxas_v(src, cuda_home, incs)
    recs, cur, spill = [], None, (0, 0)
    for ln in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", ln)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", ln)
        if m and cur:
            t = re.search(r"zo_apply_kernelILi(\d)ELi(\d)ELi(n?\d+)E", cur)
            dt, minb, spec = (int(t.group(1)), int(t.group(2)), int(t.group(3).replace("n", "-"))) if t else (None,) * 3
            what = "generic" if spec == -1 else (["perturb_", "update_", "perturbed_copy"][spec // 8]  # spec_of()
                                                  + (" with prior" if spec & 4 else "")
                                                  + " " + ["gaussian", "rademacher", "gaussian_fast"][spec & 3])
            dts = {0: "fp32", 1: "fp16", 2: "bf16", 3: "bf16_hw", 4: "fp16_hw"}  # 3, 4: device-only storage types
            flags = re.findall(r"Lb([01])E", cur[t.end():t.end() + 16]) if t else []
            xor = flags[:1] == ["1"]          # the fp32 exchange (MAZO_CUDA_F32_XOR)
            masked = flags[1:2] == ["1"]      # the masked kernels (threshold, packed-bit, row-index masks)
            dense = flags[2:3] == ["1"]       # the dense-only kernels (calls made with dense_aligned)
            recs.append({"kernel": what + (" masked" if masked else "") + (" dense" if dense else ""),
                         "dtype": (dts.get(dt) or "?") + ("_xor" if xor else ""), "min_blocks": minb,
                         "registers": int(m.group(1)), "spill_store_bytes": spill[0], "spill_load_bytes": spill[1]})
            cur = None
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="core", choices=("core", "all", "fp32-tiles", "rowidx"),
                    help="fp32-tiles: masked fp32 in both tiles, at the host's warps; rowidx: bf16 row-index element "
                    "units, every pass, at the host's warps")
    ap.add_argument("--warps", type=int, default=0, help="compile every case at these warps (default: the host's "
                    "for fp32-tiles, FAST_NUM_WARPS otherwise)")
    ap.add_argument("--maxnreg", type=int, default=-1, help="a register cap for every case (ptxas maxnreg; 0: none; "
                    "default: the host's, triton_kernels._fast_maxnreg)")
    ap.add_argument("--match", default="", help="only the cases whose label contains this text")
    ap.add_argument("--out", default=None, help="JSON output (default: print only)")
    ap.add_argument("--cuda", action="store_true", help="also ptxas -v of the CUDA kernels (needs nvcc; ~2 min)")
    args = ap.parse_args(argv)
    cuda_recs = []
    if args.cuda:
        home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        cuda_recs = cuda_kernels(home)
        for r in cuda_recs:
            print(f"CUDA {r['kernel']:32s} {r['dtype']:5s} min_blocks {r['min_blocks']}  {r['registers']} registers  "
                  f"spills {r['spill_store_bytes']} / {r['spill_load_bytes']} B", flush=True)
    fblock, warps = int(tk.FAST_BLOCK), args.warps or int(tk.FAST_NUM_WARPS)
    per_thread = fblock // (32 * warps)
    recs = []
    chosen = {"fp32-tiles": fp32_tile_cases, "rowidx": rowidx_cases}.get(args.cases)
    for label, consts in (chosen() if chosen else cases(args.cases)):
        if args.match not in label:
            continue
        t0 = time.time()
        if args.cases in ("fp32-tiles", "rowidx") and not args.warps:
            warps = host_warps(consts)
            per_thread = fblock // (32 * warps)
        maxnreg = host_maxnreg(consts) if args.maxnreg < 0 else args.maxnreg
        k = compile_fast(consts, warps, fblock, int(tk.BLOCK), maxnreg)
        st = sass_stats(k.asm["cubin"])
        # the issue budget per element scales with the bytes an element moves (fp32: twice bf16's)
        budget = 31.5 * (2 if consts["DT"] == 0 else 1)
        st.update(case=label, elements_per_thread=per_thread,
                  instructions_per_element=round(st["instructions"] / per_thread, 2),
                  alu_instructions_per_element=round(st["alu_instructions"] / per_thread, 2),
                  # the ALU pipe's bound at the floor: the issue budget in ALU instructions is half of all of them
                  predicted_fraction_alu_bound=round(min(1.0, 0.5 * budget / (st["alu_instructions"] / per_thread)),
                                                     3),
                  issue_budget_per_element_h200=budget,
                  predicted_fraction_of_h200_floor=round(min(1.0, 0.79 * budget / (st["instructions"] / per_thread)),
                                                         3),
                  compile_s=round(time.time() - t0, 1), num_warps=warps, maxnreg=maxnreg, constexprs=consts)
        recs.append(st)
        print(f"{label:36s} {st['instructions_per_element']:7.2f} instr/elem ({st['alu_instructions_per_element']:5.2f} "
              f"ALU)  {st['registers']} regs  "
              f"stack {st['stack_bytes']} B  exchange {st['exchange']}  "
              f"-> ~{100 * st['predicted_fraction_of_h200_floor']:.0f}% of H200 floor",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        head = {"what": "static SASS of the Triton fast kernel (MODE 3), sm_90, compiled offline",
                "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "fast_block": fblock,
                "num_warps": warps, "issue_budget_per_element_h200": "31.5 (16-bit dtypes), 63 (fp32)",
                "issue_efficiency_assumed": 0.79,
                "prediction": "min(1, 0.79 * budget / instructions per element): an issue-bound estimate; it says "
                              "nothing about latency-bound cases (Rademacher perturb_ measured 75% where it predicts "
                              "100%)"}
        with open(args.out, "w") as f:
            json.dump({"header": head, "records": recs, "cuda_kernels": cuda_recs}, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
