"""Each malformed call to the C++ op (mazo_C::zo_apply_) in its own process: does it raise, or crash?

Prints one JSON line per case: {"case", "rc", "outcome"}. rc -11 is a segmentation fault.
`python bench/check_cpp_errors.py --run CASE` runs one case in this process (e.g. under cuda-gdb for a backtrace)."""
import json
import subprocess
import sys

SETUP = """
import torch, mazo_kernels as mk
from mazo_kernels import reference as ref
w = (torch.randn(1000) * 0.02).to(torch.bfloat16)
plan = mk.ZOPlan([("a.weight", w)])
g = plan.groups[0]
print("cuda ext", mk.has_cuda(), "cpu ext", mk.has_cpu(), end="; ")
C = torch.ops.mazo_C.zo_apply_
"""
CASES = {
    "bad_op": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), 9, 0, 0, 0, 0, 0.1, 0.0, 0.0, None)",
    "seed_dev_short_perturb": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, torch.zeros(1, dtype=torch.int64))",
    "seed_dev_short_update": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1, 2], torch.zeros(1), ref.OP_UPDATE, 0, 0, 0, 0, 0.0, 0.0, 1.0, torch.zeros(2, dtype=torch.int64))",
    "seed_dev_int32": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, torch.zeros(2, dtype=torch.int32))",
    "bad_dtype": "C([torch.zeros(8, dtype=torch.int32)], [], [torch.zeros(0, dtype=torch.uint8)], g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, None)",
    "bad_mask_kind": "m = g.meta.clone(); m[0, 2] = 7; C(g.tensors, [], g.masks, m, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, None)",
    "seed_dev_ok": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, torch.zeros(2, dtype=torch.int64))",
    "seed_dev_ok_cuda_on_cpu_params": "C(g.tensors, [], g.masks, g.meta, g.fvals, [1], torch.zeros(0), ref.OP_PERTURB, 0, 0, 0, 0, 0.1, 0.0, 0.0, torch.zeros(2, dtype=torch.int64, device='cuda'))",
}
if len(sys.argv) > 2 and sys.argv[1] == "--run":     # one case in this process (for a debugger)
    exec(SETUP + CASES[sys.argv[2]])
    sys.exit(0)
for name, call in CASES.items():
    code = SETUP + f"""
try:
    {call}
    print("returned")
except Exception as e:
    print("raised", type(e).__name__, str(e).splitlines()[0][:160])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(json.dumps({"case": name, "rc": p.returncode, "outcome": (p.stdout.strip() or p.stderr.strip()[-300:])}))
