"""call7's row-index records that today's code runs: every CUDA record, and the Triton records of the cases where
mazo_kernels.triton_kernels._rowidx_element_policy picks element units (call 7 ran element units in every case; the
other Triton cases run entry units, as in session 12's full matrix). Writes matrix_s13_rowidx_policy.json here.

    PYTHONPATH=. python bench/results/h200_2026-12-02/s13/select_rowidx_policy.py   # from the repository root
"""
import json
import os

import torch

from mazo_kernels import reference as ref
from mazo_kernels.triton_kernels import _rowidx_element_policy

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = {"perturb_": (ref.OP_PERTURB, 0.0), "perturb_prior": (ref.OP_PERTURB, 1.0), "update_": (ref.OP_UPDATE, 1.0),
       "update0": (ref.OP_UPDATE, 0.0), "perturbed_copy": (ref.OP_COPY, 0.0)}
DISTS = {"gaussian": ref.DIST_GAUSSIAN, "rademacher": ref.DIST_RADEMACHER, "gaussian_fast": ref.DIST_GAUSSIAN_FAST}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

d = json.load(open(os.path.join(HERE, "call7", "matrix_s13_rowidx_all.json")))
keep = []
for r in d["records"]:
    op, prior = OPS[r["op"]]
    if r["backend"] == "cuda" or _rowidx_element_policy(op, DISTS[r["distribution"]], DTYPES[r["dtype"]], prior):
        keep.append(r)
d["records"] = keep
d["selection_note"] = ("derived by select_rowidx_policy.py from call7/matrix_s13_rowidx_all.json: the CUDA records "
                       "and the Triton records where _rowidx_element_policy picks element units")
json.dump(d, open(os.path.join(HERE, "matrix_s13_rowidx_policy.json"), "w"), indent=1)
print(len(keep), "of", len(json.load(open(os.path.join(HERE, "call7", "matrix_s13_rowidx_all.json")))["records"]))
