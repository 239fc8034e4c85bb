#!/usr/bin/env bash
# Session 25, call 1 (fresh machine): build; the row-index search forms and CUDA in one process (7B bf16); 7B fp32
# row-index with its caps as defaults, both backends and the baselines; the fp32 Rademacher row-index forms.
# Run from the repository root: MAZO_RUN_COMMIT=<commit> bash bench/results/h200_2026-12-03/s25/run_call1.sh
set -u
O=$OUT
export MAZO_RUN_COMMIT
date > $O/runs.log
(OUT=/tmp/gc SKIP_TESTS=1 CPU_SUITE=0 OLD_BENCH=0 MATRIX=none bash bench/gpu_check.sh > $O/build_log.txt 2>&1)
tail -2 $O/build_log.txt >> $O/runs.log; date >> $O/runs.log
B="python3 bench/bench_matrix.py --out $O --masks rowindex --iters 5 --model 7b"
timeout 200 $B --no-baselines --backends cuda,triton --dtypes bf16 \
  --ops perturb_,perturb_prior,update_,update0,perturbed_copy --dists gaussian,gaussian_fast,rademacher \
  --triton-variants 'late:ROWIDX_FIRST_LATE=1;bin:ROWIDX_PROBES=0;s24:ROWIDX_PROBES=0,ROWIDX_FIRST_LATE=1' \
  --tag s25_search_7b >> $O/runs.log 2>&1
date >> $O/runs.log
timeout 200 $B --baseline-iters 2 --backends cuda,triton --dtypes fp32 \
  --ops perturb_,perturb_prior,update_,update0,update_next,perturbed_copy --dists gaussian,gaussian_fast,rademacher \
  --tag s25_rowidx_7b_fp32 >> $O/runs.log 2>&1
date >> $O/runs.log
timeout 120 $B --no-baselines --backends triton --dtypes fp32 --ops perturb_prior,update_ --dists rademacher \
  --triton-variants 'w8:FAST_NUM_WARPS=8;rt:FP32_ROW_THREAD=1;r8off:RAD_ROWS8=0;c64:ROWIDX_MAXNREG=64' \
  --tag s25_fp32_rad_forms >> $O/runs.log 2>&1
date >> $O/runs.log
for f in $O/*.part; do [ -e "$f" ] && mv "$f" "${f%.part}"; done
grep -c "ms (host" $O/runs.log
