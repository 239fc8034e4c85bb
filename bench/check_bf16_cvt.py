"""GPU check of the Triton backend's hardware bf16 rounding (MAZO_TRITON_HW_BF16=1): for all 2^32 float32 bit
patterns, `x.to(tl.bfloat16)` (cvt.rn.bf16x2.f32) with NaN replaced by 0x7FC0 must equal the spec's integer rounding
`(b + 0x7FFF + ((b >> 16) & 1)) >> 16`, NaN -> 0x7FC0 (docs/NOISE_SPEC.md section 4). Also checks the restore's
no-NaN form (no fix-up) on every non-NaN input. Writes a JSON line; exit status 1 on any mismatch.

    python bench/check_bf16_cvt.py [--out bf16_cvt_check.json]

(The CUDA backend's fp16 conversion was checked the same way: bench/check_f16_cvt.cu.)
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _count_mismatches(out_ptr, base, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (base + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)).to(tl.uint32)
    x = b.to(tl.float32, bitcast=True)
    spec = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    spec = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, spec & 0xFFFF)
    raw = x.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hw = tl.where(x != x, 0x7FC0, raw)
    bad = tl.sum((hw != spec).to(tl.int32), axis=0)
    bad_nonan = tl.sum(((raw != spec) & (x == x)).to(tl.int32), axis=0)
    tl.atomic_add(out_ptr, bad)
    tl.atomic_add(out_ptr + 1, bad_nonan)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    block, chunk = 4096, 1 << 30
    out = torch.zeros(2, dtype=torch.int32, device="cuda")
    t0 = time.time()
    for base in range(0, 1 << 32, chunk):
        _count_mismatches[(chunk // block,)](out, base, BLOCK=block)
    torch.cuda.synchronize()
    res = {"check": "triton fp32->bf16 hardware rounding vs spec integer rounding, all 2^32 inputs",
           "mismatches": int(out[0]), "mismatches_non_nan_without_fixup": int(out[1]),
           "device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 2)}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    raise SystemExit(1 if res["mismatches"] or res["mismatches_non_nan_without_fixup"] else 0)


if __name__ == "__main__":
    main()
