#!/usr/bin/env bash
# Session 25, call 2 (warm on call 1's machine, no build): the 16-bit Rademacher perturb_ row-index forms (7B);
# 125M row-index in every dtype with both backends, the search forms as variants (bit checks); the GPU row-index tests.
# Run from the repository root: MAZO_RUN_COMMIT=<commit> bash bench/results/h200_2026-12-03/s25/run_call2.sh
set -u
O=$OUT
export MAZO_RUN_COMMIT
date > $O/runs.log
B="python3 bench/bench_matrix.py --out $O --masks rowindex --iters 5"
timeout 120 $B --model 7b --no-baselines --backends cuda,triton --dtypes bf16,fp16 --ops perturb_ --dists rademacher \
  --triton-variants 'n8:RAD_ROWS8=0;w4:MASKED_NUM_WARPS_RAD=4;c64:ROWIDX_MAXNREG=64' \
  --tag s25_rad_perturb_forms >> $O/runs.log 2>&1
date >> $O/runs.log
timeout 240 $B --model 125m --no-baselines --backends cuda,triton --dtypes bf16,fp16,fp32 \
  --ops perturb_,perturb_prior,update_,update0,update_next,perturbed_copy --dists gaussian,gaussian_fast,rademacher \
  --triton-variants 'bin:ROWIDX_PROBES=0;s24:ROWIDX_PROBES=0,ROWIDX_FIRST_LATE=1' \
  --tag s25_rowidx_125m >> $O/runs.log 2>&1
date >> $O/runs.log
for f in $O/*.part; do [ -e "$f" ] && mv "$f" "${f%.part}"; done
timeout 150 python3 -m pytest -q python_tests/test_gpu_backends.py -k rowindex -x > $O/tests_rowindex.txt 2>&1
tail -2 $O/tests_rowindex.txt >> $O/runs.log; date >> $O/runs.log
