"""The session-14 records that the final commit (0b7bfef) runs, from the four device calls (each ran another commit;
S14_README.md says which). Writes matrix_s14_current.json here, an input of the README's speed table.

- call4 (0b7bfef itself): CUDA update_ and update0, bf16/fp16, gaussian_fast and Rademacher, no mask.
- call3 (cf74b86): every Triton record (Triton did not change this session); CUDA perturb_, perturb_prior and
  perturbed_copy, and the threshold-masked passes except update0 with gaussian_fast (cf74b86 computed its noise
  ahead, which 0b7bfef reverted); the other kernels are the same code in both commits. Its update_ / update0 CUDA
  records without a mask are call4's.
- call2 (bd2549b): v1 Gaussian, CUDA and Triton. 0b7bfef runs the dense-only kernel for v1 perturb_prior (call2's
  default records) and the specialisations for the other v1 passes (call2's `nodense` records, relabelled); the
  kernels are the same code in both commits for these cases.

    python bench/results/h200_2026-12-02/s14/select_current.py   # from the repository root
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(call, name):
    return json.load(open(os.path.join(HERE, call, name)))


c2, c3, c4 = (load("call2", "matrix_s14_packed.json"), load("call3", "matrix_s14_call3.json"),
              load("call4", "matrix_s14_call4_update.json"))
keep = [r for r in c4["records"]]
for r in c3["records"]:
    if r["backend"] == "triton":
        keep.append(r)
    elif r["mask"] == "none" and r["op"] in ("perturb_", "perturb_prior", "perturbed_copy"):
        keep.append(r)
    elif r["mask"] == "threshold" and not (r["op"] == "update0" and r["distribution"] == "gaussian_fast"):
        keep.append(r)
for r in c2["records"]:
    if r["distribution"] != "gaussian":
        continue
    if r["backend"] == "triton" and r.get("variant", "") == "":
        keep.append(r)
    elif r["backend"] == "cuda":
        dense = r["op"] == "perturb_prior"
        if r.get("variant", "") == ("" if dense else "nodense"):
            keep.append(dict(r, variant="", selected_from_variant=r.get("variant", "")))
out = dict(c3)
out["records"] = keep
out["git_commit_as_run"] = "0b7bfef"
out["git_commit_note"] = "records selected from calls 2-4, each run on another commit whose kernels for these cases are 0b7bfef's"
out["selection_note"] = __doc__.strip().splitlines()[0]
json.dump(out, open(os.path.join(HERE, "matrix_s14_current.json"), "w"), indent=1)
print(len(keep), "records")
