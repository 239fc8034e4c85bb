#!/usr/bin/env bash
# Build, test and benchmark on the GPU machine in one call; results land in $OUT (or bench/results/gpu_run).
# Usage (device tool): bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 - <<'PY' > "$OUT/env.json"
import json, platform, time, torch, triton
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}))
PY
cat "$OUT/env.json"
( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"
python3 -c "import mazo_kernels as mk; print('cpu', mk.has_cpu(), 'cuda', mk.has_cuda(), 'triton', mk.has_triton())"
python3 -m pytest -q python_tests/test_gpu_backends.py ${PYTEST_EXTRA:-} --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
MAZO_TEST_BACKEND=cuda python3 -m pytest -q python_tests/test_cpu_backend.py ${PYTEST_EXTRA:-} 2>&1 | tee "$OUT/cuda_via_cpu_suite.log" | tail -3
PYTHONPATH=.:bench python3 bench/bench_transform.py --out "$OUT" 2>&1 | tail -40
python3 bench/bench_ops.py --out "$OUT" 2>&1 | tail -12
python3 - <<'PY'
import json, os, xml.etree.ElementTree as ET
out = os.environ.get("OUT", "bench/results/gpu_run")
env = json.load(open(os.path.join(out, "env.json")))
r = ET.parse(os.path.join(out, "gpu_tests.xml")).getroot()
ts = r if r.tag == "testsuite" else r.find("testsuite")
env["gpu_tests"] = {k: int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(env, open(os.path.join(out, "gpu_check_summary.json"), "w"), indent=1)
print(json.dumps(env))
PY
