#!/usr/bin/env bash
# Build, test and benchmark on the GPU machine in one call; results land in $OUT (or bench/results/gpu_run).
# Usage (device tool): bash bench/gpu_check.sh
# Knobs (environment):
#   SKIP_BUILD=1     use the installed package          SKIP_TESTS=1   skip the GPU test suites
#   TEST_VARIANT_ENV="VAR=value ..."  run the CUDA tests once more with these variables set
#   HW_BF16_CHECK=1  the hardware bf16 rounding (the default): bench/check_bf16_cvt.cu and .py (all 2^32 inputs),
#                    then the GPU suites once more with the integer rounding (MAZO_TRITON_HW_BF16=0 MAZO_CUDA_HW_BF16=0)
#   PROBES=1         bench/probe_cuda_leads.cu: fp16 -> f32 hardware conversion vs the spec (all 65,536), and the
#                    fp32 fast path's access pattern vs coalesced layouts (-> $OUT/probe_cuda_leads.json)
#   CPU_SUITE=0      skip test_cpu_backend.py through the CUDA backend   WARM_TRITON=1  compile Triton during the build
#   OLD_BENCH=0      skip bench_transform.py / bench_ops.py (the single-tensor first looks; default 1)
#   MATRIX=core|full|none   bench/bench_matrix.py selection (default core); MATRIX_ARGS: extra arguments for it,
#                    e.g. "--model 7b --dtypes bf16,fp16"
#   SEEDLOG=1        bench/gpu_seedlog.py: ZOSGD runs whose seed logs python_tests/test_replay.py replays on the CPU
#                    (-> $OUT/gpu_seedlog.tgz; unpack into bench/results/)
#   ZOSTEP=1         bench/bench_zo_step.py: one ZO step in place / transient / MeZO-style (time, memory, drift)
#   NCU=1            Nsight Compute on bench/profile_cases.py (one launch per op case and backend, 2^28
#                    elements): SpeedOfLight, compute, occupancy, warp-state and instruction sections, the stall
#                    reasons and pipe loads -> $OUT/ncu.csv (bf16), $OUT/ncu_<dtype>.csv (NCU_DTYPES="bf16 fp16")
#   E2E_PHASES="..." bench/e2e_gpu.sh with these phases (e.g. "graph 7b 7bt") into $OUT/e2e (M7, M7T, STEPS, ...
#                    pass through; E2E_DEADLINE_S, default 400)
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
WARM_PID=
if [ "${WARM_TRITON:-0}" = 1 ]; then  # compile the matrix's Triton kernels (disk cache) while the extensions build
  ( PYTHONPATH=. python3 bench/bench_matrix.py --core ${MATRIX_ARGS:-} --model 125m --backends triton --iters 1 \
      --warmup 0 --no-baselines --check-max-numel 0 --out /tmp/triton_warm > /tmp/triton_warm.log 2>&1 ) &
  WARM_PID=$!
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  tail -3 "$OUT/build.log"
fi
if [ -n "$WARM_PID" ]; then wait "$WARM_PID"; tail -2 /tmp/triton_warm.log; fi
python3 -c "import mazo_kernels as mk; print('cpu', mk.has_cpu(), 'cuda', mk.has_cuda(), 'triton', mk.has_triton())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q python_tests/test_gpu_backends.py python_tests/test_lookahead.py ${PYTEST_EXTRA:-} \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  if [ "${CPU_SUITE:-1}" = 1 ]; then
    MAZO_TEST_BACKEND=cuda python3 -m pytest -q python_tests/test_cpu_backend.py ${PYTEST_EXTRA:-} 2>&1 | tee "$OUT/cuda_via_cpu_suite.log" | tail -3
  fi
  if [ -n "${TEST_VARIANT_ENV:-}" ]; then  # e.g. TEST_VARIANT_ENV=MAZO_CUDA_WAVES=1: the GPU suite once more under it
    env $TEST_VARIANT_ENV python3 -m pytest -q python_tests/test_gpu_backends.py -k "${TEST_VARIANT_K:-cuda}" 2>&1 | tee "$OUT/gpu_tests_variant.log" | tail -3
    env $TEST_VARIANT_ENV MAZO_TEST_BACKEND=cuda python3 -m pytest -q python_tests/test_cpu_backend.py 2>&1 | tee -a "$OUT/gpu_tests_variant.log" | tail -3
  fi
fi
if [ "${HW_BF16_CHECK:-0}" = 1 ]; then  # the hardware bf16 rounding (Triton and CUDA), and the integer path's suites
  nvcc -std=c++17 -arch=sm_90 --fmad=false -Icsrc bench/check_bf16_cvt.cu -o /tmp/check_bf16_cvt \
    && /tmp/check_bf16_cvt | tee "$OUT/bf16_cvt_check_cuda.json"
  python3 bench/check_bf16_cvt.py --out "$OUT/bf16_cvt_check_triton.json" 2>&1 | tail -2
  MAZO_TRITON_HW_BF16=0 MAZO_CUDA_HW_BF16=0 python3 -m pytest -q python_tests/test_triton_backend.py \
    python_tests/test_gpu_backends.py 2>&1 | tee "$OUT/gpu_tests_int_bf16.log" | tail -3
  MAZO_CUDA_HW_BF16=0 MAZO_TEST_BACKEND=cuda python3 -m pytest -q python_tests/test_cpu_backend.py 2>&1 \
    | tee -a "$OUT/gpu_tests_int_bf16.log" | tail -3
fi
if [ "${PROBES:-0}" = 1 ]; then  # seconds of GPU time; decides the two CUDA leads of bench/NOTES.md, "Session 8"
  nvcc -std=c++17 -O3 -arch=sm_90 --fmad=false -Icsrc bench/probe_cuda_leads.cu -o /tmp/probe_cuda_leads \
    && /tmp/probe_cuda_leads | tee "$OUT/probe_cuda_leads.json"
fi
if [ "${OLD_BENCH:-1}" = 1 ]; then
  PYTHONPATH=.:bench python3 bench/bench_transform.py --out "$OUT" 2>&1 | tail -40
  python3 bench/bench_ops.py --out "$OUT" 2>&1 | tail -12
fi
case "${MATRIX:-core}" in
  core) python3 bench/bench_matrix.py --core ${MATRIX_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/matrix.log" | grep -v '^  baseline' ;;
  full) python3 bench/bench_matrix.py --full ${MATRIX_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/matrix.log" | grep -v '^  baseline' ;;
  none) ;;
  *) echo "MATRIX must be core, full or none"; exit 2 ;;
esac
if [ "${SEEDLOG:-0}" = 1 ]; then
  rm -rf /tmp/gpu_seedlog && python3 bench/gpu_seedlog.py --out /tmp/gpu_seedlog 2>&1 | tail -8
  tar czf "$OUT/gpu_seedlog.tgz" -C /tmp gpu_seedlog
fi
if [ "${ZOSTEP:-0}" = 1 ]; then
  python3 bench/bench_zo_step.py ${ZOSTEP_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/zo_step.log" | tail -12
fi
if [ "${NCU:-0}" = 1 ]; then  # one profile per dtype (NCU_DTYPES); the stall reasons and pipe loads as raw metrics
  for dt in ${NCU_DTYPES:-bf16}; do
    f="$OUT/ncu.csv"; [ "$dt" != bf16 ] && f="$OUT/ncu_$dt.csv"
    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section LaunchStats --section InstructionStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active" \
        --csv --page details python3 bench/profile_cases.py --dtype "$dt" ${NCU_ARGS:-} > "$f" 2> "$OUT/ncu_$dt.log"
    echo "ncu $dt rc $? ($(wc -l < "$f") csv lines)"; tail -5 "$OUT/ncu_$dt.log"
  done
fi
if [ -n "${E2E_PHASES:-}" ]; then
  OUT="$OUT/e2e" PHASES="$E2E_PHASES" DEADLINE_S=${E2E_DEADLINE_S:-400} SKIP_BUILD=1 bash bench/e2e_gpu.sh 2>&1 \
    | tee "$OUT/e2e_run.log" | grep -v "^\s*$" | tail -60
fi
python3 - <<'PY'
import json, os, xml.etree.ElementTree as ET
out = os.environ.get("OUT", "bench/results/gpu_run")
env = json.load(open(os.path.join(out, "env.json")))
x = os.path.join(out, "gpu_tests.xml")
if os.path.exists(x):
    r = ET.parse(x).getroot()
    ts = r if r.tag == "testsuite" else r.find("testsuite")
    env["gpu_tests"] = {k: int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(env, open(os.path.join(out, "gpu_check_summary.json"), "w"), indent=1)
print(json.dumps(env))
PY
# the device tool returns at most 8 files: logs go back as one archive
( cd "$OUT" && ls *.log *.xml env.json 2>/dev/null | tar czf logs.tgz -T - && ls *.log *.xml env.json 2>/dev/null | xargs rm -f )
ls -la "$OUT"
