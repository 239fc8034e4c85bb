"""The session-15 records that the final commit (facee84) runs, from the device calls that measured them
(S15_README.md says which commit each call ran). Writes matrix_s15_current.json here, the last input of the README's
speed table (records it holds replace the earlier sessions' records of the same case).

- call4 (facee84 itself): bf16, no mask, gaussian_fast and Rademacher: perturb_, perturb_prior, update_, update0,
  CUDA and Triton.
- call3 (795844f): fp16, no mask, every op, CUDA and Triton; bf16 perturbed_copy. facee84 changed only the bf16
  stochastic rounding (the update passes) and the optimizer's Python after 795844f, so these kernels are the same code.

Cases not re-timed in session 15 (v1 Gaussian, masked passes, fp32) keep their earlier records in the table; the
kernels of the masked and fp16 passes changed this session (bench/NOTES.md, "Session 15").

    python bench/results/h200_2026-12-02/s15/select_current.py   # from the repository root
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
c3 = json.load(open(os.path.join(HERE, "call3", "matrix_s15_call3.json")))
c4 = json.load(open(os.path.join(HERE, "call4", "matrix_s15_call4.json")))
keep = list(c4["records"])
for r in c3["records"]:
    if r["dtype"] == "fp16" or (r["dtype"] == "bf16" and r["op"] == "perturbed_copy"):
        keep.append(r)
out = {k: v for k, v in c4.items() if k != "records"}
out["selection_note"] = __doc__.strip().split("\n\n")[0]
out["sources"] = {"call4/matrix_s15_call4.json": c4["git_commit_as_run"], "call3/matrix_s15_call3.json": c3["git_commit_as_run"]}
out["records"] = keep
json.dump(out, open(os.path.join(HERE, "matrix_s15_current.json"), "w"), indent=1)
print(f"wrote matrix_s15_current.json ({len(keep)} records)")
