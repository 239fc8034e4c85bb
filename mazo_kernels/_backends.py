"""Find the backends. Importing this module never fails; asking for a missing backend says what to install."""
from __future__ import annotations

import importlib
import os

import torch

_cache: dict = {}


class BackendUnavailable(RuntimeError):
    pass


def _load_cpu_ext():
    if "cpu" not in _cache:
        try:
            _cache["cpu"] = importlib.import_module("mazo_kernels._C")
        except ImportError as exc:
            _cache["cpu"] = exc
    return _cache["cpu"]


def _load_cuda_ext():
    if "cuda" not in _cache:
        cpu = _load_cpu_ext()  # the CUDA library registers into the schema the CPU library defines
        if isinstance(cpu, Exception):
            _cache["cuda"] = cpu
        else:
            try:
                _cache["cuda"] = importlib.import_module("mazo_kernels._C_cuda")
            except ImportError as exc:
                _cache["cuda"] = exc
    return _cache["cuda"]


def has_cpu() -> bool:
    return not isinstance(_load_cpu_ext(), Exception)


def has_cuda() -> bool:
    return not isinstance(_load_cuda_ext(), Exception)


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require(backend: str):
    if backend == "cpu" and not has_cpu():
        raise BackendUnavailable(
            f"the 'cpu' backend needs the C++ extension mazo_kernels._C, which is not built ({_load_cpu_ext()}). "
            "Reinstall with `pip install --no-build-isolation -e .` and a C++ compiler, ninja and torch present.")
    if backend == "cuda" and not has_cuda():
        raise BackendUnavailable(
            f"the 'cuda' backend needs the CUDA extension mazo_kernels._C_cuda, which is not built "
            f"({_load_cuda_ext()}). Install a CUDA build of torch and the CUDA toolkit (nvcc, CUDA_HOME), then "
            "reinstall with `pip install --no-build-isolation -e .` (MAZO_SKIP_CUDA must be unset).")
    if backend == "triton" and not has_triton():
        raise BackendUnavailable("the 'triton' backend needs `pip install triton` (ships with CUDA builds of torch)")


def resolve(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "reference", "cpu", "triton", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, reference, cpu, triton or cuda")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if has_cuda() else "triton"
        return "cpu" if has_cpu() else "reference"
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors; these are on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors; these are on {device}")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return backend


def kernel(backend: str):
    require(backend)
    if backend == "reference":
        from .reference import zo_apply_
        return zo_apply_
    if backend == "triton":
        from .triton_kernels import zo_apply_
        return zo_apply_
    if backend in ("cpu", "cuda"):
        if backend == "cuda":
            _load_cuda_ext()
        return torch.ops.mazo_C.zo_apply_
    raise AssertionError(backend)
