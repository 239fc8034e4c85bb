"""Find the backends. Importing this module never fails; asking for a missing backend says what to install."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import backend_policy

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
    if backend == "fastest":
        for b in ("cuda", "triton"):
            try:
                require(b)
            except BackendUnavailable as exc:
                raise BackendUnavailable(f"the 'fastest' backend picks cuda or triton per pass and needs both: {exc}")


_PASS_NAMES = {(0, False): "perturb_", (0, True): "perturb_prior", (1, False): "update0", (1, True): "update_",
               (2, False): "perturbed_copy", (2, True): "perturbed_copy", (3, False): "update_next",
               (3, True): "update_next"}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DIST_NAMES = {0: "gaussian", 1: "rademacher", 2: "gaussian_fast"}


def pass_backend(op: int, dist: int, prior: float, dtype: torch.dtype, masks) -> str:
    """The backend that runs this pass under backend="fastest": triton where backend_policy.TRITON lists its
    (dtype, mask class, pass, noise), else cuda. A call with a row-index mask is of class "rowindex", else one with
    any other mask tensor "bytes" (threshold latch or packed bits), else "none"."""
    cls = "none"
    for m in masks:
        if m.numel():
            if m.dtype == torch.int32 and m.dim() == 2:
                cls = "rowindex"
                break
            cls = "bytes"
    key = (_DTYPE_NAMES.get(dtype), cls, _PASS_NAMES.get((int(op), prior != 0.0)), _DIST_NAMES.get(int(dist)))
    return "triton" if key in backend_policy.TRITON else "cuda"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return tuple(torch.cuda.get_device_capability(device))


def resolve(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "reference", "cpu", "triton", "cuda", "fastest"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, reference, cpu, triton, cuda or fastest")
    if backend == "fastest" and device.type != "cuda":
        raise ValueError(f"backend 'fastest' (cuda or triton per pass) runs on CUDA tensors; these are on {device}")
    if backend == "auto":
        if device.type == "cuda":
            # both GPU backends: each pass on the one measured faster for it ("fastest"; the same bits either way).
            # The table was measured on Hopper; before Ampere (sm_80) the CUDA extension alone.
            if has_cuda():
                return "fastest" if has_triton() and _capability(device) >= (8, 0) else "cuda"
            return "triton"
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
