"""csrc/zo_noise.h's invert_rounding (the restore rule the CPU and CUDA kernels run) computes the spec's comparisons
in fewer instructions; bench/check_invert_rounding.cpp compares it with the literal form for every bf16 and fp16
storage value and thousands of shifts each, ties included. Built here with the flags the extension uses."""
import os
import subprocess

from torch.utils.cpp_extension import get_cxx_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_invert_rounding_matches_spec_form_for_every_16bit_value(tmp_path):
    exe = str(tmp_path / "check_invert_rounding")
    build = subprocess.run([get_cxx_compiler(), "-O2", "-ffp-contract=off", "-fno-fast-math", "-std=c++17",
                            "-I" + os.path.join(ROOT, "csrc"), os.path.join(ROOT, "bench", "check_invert_rounding.cpp"),
                            "-o", exe], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and lines[-1] == "OK", run.stdout[-3000:]
    counts = {ln.split(":")[0]: ln for ln in lines if "cases" in ln}
    for dt in ("bf16", "bf16_hw", "fp16", "fp16_hw"):  # the check really ran over every storage value
        cases = int(counts[dt].split(": ")[1].split(" cases")[0])
        assert cases > 65536 * 2000, counts[dt]
        assert counts[dt].endswith(" 0 mismatches"), counts[dt]
