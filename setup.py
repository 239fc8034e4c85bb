"""Build the C++ (always) and CUDA (when possible) extensions. Package metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .            # builds against the torch already installed

Environment:
    MAZO_SKIP_CUDA=1        do not build mazo_kernels._C_cuda
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;8.6;8.9;9.0+PTX")
    MAX_JOBS                parallel compile jobs (ninja)
"""
import os
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEPENDS = [os.path.join(CSRC, f) for f in ("zo_noise.h", "zo_apply_common.h", "zo_host_common.h", "zo_f32_exchange.cuh",
                                           "zo_global_access.cuh", "zo_cuda_kernel.cuh")]
# The CUDA extension: the host side, and one file per storage kernel family so that ninja compiles them in parallel.
CUDA_SOURCES = ["zo_cuda.cu"] + [f"zo_cuda_k_{f}.cu" for f in ("bf16", "bf16_hw", "f16", "f16_hw", "f32", "f32_xor")]

# Bits must match reference.py: no FMA contraction, no fast-math, IEEE division and sqrt.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]  # torch adds the -std it needs (c++17 or c++20)
NVCC_FLAGS = ["-O3", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false",
              "-Xcompiler", "-ffp-contract=off",
              # each .cu file holds a dozen kernel instantiations: compile the architectures in parallel too
              "--threads", str(max(1, min(4, os.cpu_count() or 1)))]


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _want_cuda():
    if os.environ.get("MAZO_SKIP_CUDA", "0") == "1":
        return False
    if not torch.version.cuda:
        return False
    return _cuda_home() is not None


ext_modules = [
    CppExtension(
        "mazo_kernels._C",
        [os.path.join(CSRC, "zo_cpu.cpp")],
        include_dirs=[os.path.join(HERE, CSRC)],
        depends=DEPENDS,
        extra_compile_args={"cxx": CXX_FLAGS},
    )
]

if _want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
    home = _cuda_home()
    os.environ.setdefault("CUDA_HOME", home)
    cpp_extension.CUDA_HOME = home  # torch resolves nvcc from this module attribute
    from torch.utils.cpp_extension import CUDAExtension

    ext_modules.append(
        CUDAExtension(
            "mazo_kernels._C_cuda",
            [os.path.join(CSRC, f) for f in CUDA_SOURCES],
            include_dirs=[os.path.join(HERE, CSRC)],
            depends=DEPENDS,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    )

setup(
    packages=find_packages(include=["mazo_kernels*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
