#!/usr/bin/env bash
# ZO data parallelism and FSDP2 on the GPUs of one host (NCCL, one process per GPU), in one call; results in $OUT
# (default bench/results/distributed_run). Usage (device tool, kind nvidia-h200-x2): bash bench/distributed_gpu.sh
#   1. bench/bench_distributed.py under torchrun: LLaMA-7B-shaped bf16 step time on 1 GPU vs NGPU GPUs (data
#      parallel, fixed global batch 16 x 256), replica checksum, DP / FSDP2 / device_map bit-identity checks
#      -> $OUT/bench_distributed.json
#   2. mazo-train under torchrun (NCCL) on the tiny config; the saved weights are checked by replaying the seed log
#      -> $OUT/cli_dp.json
#   3. python_tests/test_distributed.py (the CPU gloo suite) under this machine's torch -> $OUT/logs.tgz
# Knobs: NGPU (default 2), BENCH_ARGS (extra bench_distributed.py arguments), CLI=0, CPU_TESTS=0,
#        BUDGET (seconds for the whole script, default 470: each stage's timeout is cut to what is left).
# NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (exported below).
set -uo pipefail
OUT=${OUT:-bench/results/distributed_run}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
NGPU=${NGPU:-2}
T0=$(date +%s)
BUDGET=${BUDGET:-470}
left() {  # seconds left of the budget, capped at $1
  local l=$(( BUDGET - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; echo $(( l > 0 ? l : 1 ))
}
if ! python3 -c "import mazo_kernels._C_cuda" 2>/dev/null; then     # a fresh machine: build the package first
  echo "building mazo_kernels (CUDA extension missing)"
  ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  tail -3 "$OUT/build.log"
fi
python3 -c "import mazo_kernels as mk; print('cpu', mk.has_cpu(), 'cuda', mk.has_cuda(), 'triton', mk.has_triton())"
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1

timeout "$(left 330)" python3 -m torch.distributed.run --nproc_per_node "$NGPU" bench/bench_distributed.py --out "$OUT" \
    ${BENCH_ARGS:-} > "$OUT/bench_distributed.log" 2>&1
echo "bench_distributed rc $? after $(( $(date +%s) - T0 )) s"
grep -v "Warning\|return func" "$OUT/bench_distributed.log" | tail -12

if [ "${CLI:-1}" = 1 ] && [ "$(left 999)" -gt 60 ]; then
  rm -rf /tmp/cli_dp
  timeout "$(left 100)" python3 -m torch.distributed.run --nproc_per_node "$NGPU" -m mazo_kernels.cli --config tiny \
      --tasks python_tests/data/task_sentiment.jsonl python_tests/data/task_echo.jsonl --steps 20 --batch-size 8 \
      --eval-examples 8 --lr 1e-3 --output-dir /tmp/cli_dp --no-progress --replica-check-every 5 \
      > "$OUT/cli_dp.log" 2>&1
  echo "mazo-train (torchrun x$NGPU) rc $?"
  python3 - <<'PY'
import json, os, torch, mazo_kernels as mk
from safetensors.torch import load_file
from mazo_kernels.tiny import tiny_llama
out, run = os.environ.get("OUT", "bench/results/distributed_run"), "/tmp/cli_dp"
res = {}
try:
    m = json.load(open(os.path.join(run, "metrics.json")))
    res = {k: m.get(k) for k in ("world_size", "device", "backend", "steps", "steps_per_s")}
    res["final_eval"] = m["evals"][-1]["mean_accuracy"] if m["evals"] else None
    init, _ = tiny_llama(seed=0)
    init = init.cuda()
    mk.replay(init, os.path.join(run, "seed_log.json"))
    saved = load_file(os.path.join(run, "model", "model.safetensors"))
    res["replay_equals_saved_weights"] = all(torch.equal(saved[n].cuda(), p.detach()) for n, p in init.named_parameters())
except Exception as exc:    # noqa: BLE001
    res["error"] = f"{type(exc).__name__}: {exc}"
json.dump(res, open(os.path.join(out, "cli_dp.json"), "w"), indent=1)
print("cli_dp", json.dumps(res))
PY
fi

if [ "${CPU_TESTS:-1}" = 1 ] && [ "$(left 999)" -gt 100 ]; then
  timeout "$(left 200)" python3 -m pytest -q python_tests/test_distributed.py > "$OUT/cpu_dist_tests.log" 2>&1
  echo "test_distributed.py (CPU, gloo) rc $?: $(tail -1 "$OUT/cpu_dist_tests.log")"
fi
echo "total $(( $(date +%s) - T0 )) s"
# the device tool returns few files: logs go back as one archive
( cd "$OUT" && ls *.log *.txt 2>/dev/null | tar czf logs.tgz -T - && ls *.log *.txt 2>/dev/null | xargs rm -f )
ls -la "$OUT"
