"""Generate z_table.json: known-answer values of the noise spec (version 2) from the pure-torch reference.

Run ONCE when a spec version is frozen, and commit the output:

    python python_tests/data/make_z_table.py

The table is then a test (python_tests/test_reference_spec.py): a change to mazo_kernels/reference.py that changes
any of these values changes the spec, and needs a new SPEC_VERSION and a new table, never a regenerated one.
Values are stored as float32 bit patterns in hex, so the comparison is bit-exact.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mazo_kernels import reference as ref  # noqa: E402

SEEDS = [0, 1, 2 ** 63, 2 ** 64 - 1]
TENSOR_IDS = [0, 7, 2 ** 32 - 1]
INDICES = list(range(8)) + [2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3]
DISTS = {"gaussian": ref.DIST_GAUSSIAN, "rademacher": ref.DIST_RADEMACHER,
         "gaussian_fast": ref.DIST_GAUSSIAN_FAST}  # spec v2 added gaussian_fast; the v1 rows are unchanged


def f32_hex(x: torch.Tensor) -> list[str]:
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return [f"{int(b):08x}" for b in bits]


def main(path: str) -> None:
    rows = []
    idx = torch.tensor(INDICES, dtype=torch.int64)
    for dist_name, dist in DISTS.items():
        for seed in SEEDS:
            for tid in TENSOR_IDS:
                rows.append({"dist": dist_name, "seed": str(seed), "tensor_id": tid,
                             "indices": [str(i) for i in INDICES],
                             "f32_bits": f32_hex(ref.noise(seed, tid, idx, dist))})
    table = {"spec_version": ref.SPEC_VERSION, "generator": "python_tests/data/make_z_table.py",
             "note": "seeds and indices are decimal strings (unsigned); values are float32 bit patterns in hex",
             "rows": rows}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "z_table.json"))
