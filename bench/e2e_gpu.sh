#!/usr/bin/env bash
# Issue 5 in one call on a GPU machine (H100/H200): end-to-end ZO steps, ZOSGD against MeZO as users run it.
# Usage (device tool, from the repository root): bash bench/e2e_gpu.sh
# Results in $OUT (default bench/results/e2e_run), at most 8 files:
#   e2e_7b.json e2e_30b.json e2e_125m.json e2e_125m_graph.json [e2e_13b.json] e2e.png e2e_table.md logs.tgz
# Phases (PHASES, default "7b 30b 125m graph"):
#   7b     LLaMA-7B bf16 at 16x256 and 1x512, every method: zosgd, zosgd-transient, mezo, mezo-inplace,
#          sparse-zosgd, sparse-mezo, mazo-zosgd, mazo-mezo                              (M7 overrides the list)
#   30b    LLaMA-30B bf16 at 1x512 and 4x256: zosgd, zosgd-transient, mezo-inplace, mezo (M30 overrides), with the
#          allocator capped at an H100 80GB's memory (--memory-cap h100-80gb)
#   125m   a 134M LLaMA at 16x256 and 1x512, the dense methods
#   graph  the 125m model at 1x512 (and 16x256), zosgd, plus the CUDA-graph capture attempt (own process)
#   graphla  as graph with ZOSGD(lookahead=True) captured (not in the default PHASES)
#   7bgraph  LLaMA-7B at 1x512: zosgd and mezo eager (M7G overrides), then the CUDA-graph step (mk.GraphedZOStep)
#          against the eager one, bit for bit (not in the default PHASES); 7bgrapht the same with --backend triton
#   13b    LLaMA-13B bf16 at 16x256 and 1x512, dense methods (not in the default PHASES)
#   7bt    LLaMA-7B as in 7b with --backend triton: zosgd, mezo, mezo-inplace (M7T overrides; not in the default)
#   7bf    LLaMA-7B as in 7b with --backend fastest (cuda or triton per pass) and each method again on cuda in the
#          same process (--compare-backend): sparse-zosgd, mazo-zosgd, zosgd, zosgd-lookahead with gaussian_fast
#          noise (M7F, D7F override; not in the default)
# Knobs: STEPS (5), WARMUP (2), DEADLINE_S (560: total wall budget; each phase gets at most its own budget and
#   what is left), SKIP_BUILD=1 (use the installed package; otherwise the package is built when the CUDA extension
#   is missing), E2E_ARGS (extra bench_e2e.py arguments for every phase).
set -uo pipefail
OUT=${OUT:-bench/results/e2e_run}
mkdir -p "$OUT"
LOGS=/tmp/e2e_logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
DEADLINE_S=${DEADLINE_S:-560}
PHASES=${PHASES:-"7b 30b 125m graph"}
COMMON="--steps $STEPS --warmup $WARMUP ${E2E_ARGS:-}"
ts() { date +%H:%M:%S; }
left() { echo $(( DEADLINE_S - SECONDS )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/nvidia_smi.txt"
python3 - <<'PY' | tee "$LOGS/env.json"
import json, platform, time, torch, triton
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}))
PY
if [ "${SKIP_BUILD:-0}" != 1 ] && ! python3 -c "import sys, mazo_kernels as mk; sys.exit(0 if mk.has_cuda() else 1)" 2>/dev/null; then
  echo "[$(ts)] building the package (CUDA extension, ~80 s)"
  ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  tail -3 "$LOGS/build.log"
fi
python3 -c "import mazo_kernels as mk; print('cpu', mk.has_cpu(), 'cuda', mk.has_cuda(), 'triton', mk.has_triton())"

phase() {   # phase NAME BUDGET_S ARGS...: run bench_e2e.py with a time limit, log to $LOGS/NAME.log
  local name=$1 budget=$2; shift 2
  local t=$(left)
  if [ "$t" -lt 30 ]; then echo "[$(ts)] skip $name: $t s left of DEADLINE_S=$DEADLINE_S"; return; fi
  [ "$budget" -gt "$t" ] && budget=$t
  echo "[$(ts)] phase $name (limit ${budget} s)"
  timeout --signal=INT --kill-after=15 "$budget" python3 bench/bench_e2e.py "$@" $COMMON 2>&1 | tee "$LOGS/$name.log"
  echo "[$(ts)] phase $name done (rc ${PIPESTATUS[0]})"
}

for p in $PHASES; do
  case $p in
    7b)    phase 7b 260 --model-shape 7b --batch 16,1 --seq 256,512 --method "${M7:-all}" --out "$OUT/e2e_7b.json" ;;
    7bt)   phase 7bt 200 --model-shape 7b --batch 16,1 --seq 256,512 --method "${M7T:-zosgd,mezo,mezo-inplace}" \
             --backend triton --out "$OUT/e2e_7b_triton.json" ;;
    7bf)   phase 7bf 240 --model-shape 7b --batch 16,1 --seq 256,512 --method "${M7F:-sparse-zosgd,mazo-zosgd,zosgd,zosgd-lookahead}" \
             --backend fastest --compare-backend cuda --dist "${D7F:-gaussian_fast}" --out "$OUT/e2e_7b_fastest.json" ;;
    30b)   phase 30b 200 --model-shape 30b --batch 1,4 --seq 512,256 --method "${M30:-zosgd,zosgd-transient,mezo-inplace,mezo}" \
             --memory-cap h100-80gb --out "$OUT/e2e_30b.json" ;;
    13b)   phase 13b 150 --model-shape 13b --batch 16,1 --seq 256,512 --method dense --out "$OUT/e2e_13b.json" ;;
    125m)  phase 125m 70 --model-shape 125m --batch 16,1 --seq 256,512 --method dense --out "$OUT/e2e_125m.json" ;;
    7bgraph) phase 7bgraph 200 --model-shape 7b --batch 1 --seq 512 --method "${M7G:-zosgd,mezo}" --cuda-graph \
             --out "$OUT/e2e_7b_graph.json" ;;
    7bgrapht) phase 7bgrapht 200 --model-shape 7b --batch 1 --seq 512 --method "${M7G:-zosgd,mezo}" --cuda-graph \
             --backend triton --out "$OUT/e2e_7b_graph_triton.json" ;;
    graphla) phase graphla 70 --model-shape 125m --batch 1,16 --seq 512,256 --method zosgd --cuda-graph \
             --graph-lookahead --out "$OUT/e2e_125m_graph_lookahead.json" ;;
    graph) phase graph 70 --model-shape 125m --batch 1,16 --seq 512,256 --method zosgd --cuda-graph \
             --out "$OUT/e2e_125m_graph.json" ;;
    *) echo "unknown phase $p (7b 7bt 7bf 7bgraph 7bgrapht 30b 13b 125m graph graphla)"; exit 2 ;;
  esac
done

shopt -s nullglob
files=("$OUT"/e2e_*.json)
if [ ${#files[@]} -gt 0 ]; then
  python3 bench/plot_e2e.py "${files[@]}" --out "$OUT/e2e.png" 2>&1 | tail -3
  python3 bench/make_e2e_table.py "${files[@]}" > "$OUT/e2e_table.md" 2> "$LOGS/table.err" || cat "$LOGS/table.err"
  cat "$OUT/e2e_table.md"
fi
tar czf "$OUT/logs.tgz" -C /tmp e2e_logs
echo "[$(ts)] total ${SECONDS} s"
ls -la "$OUT"
