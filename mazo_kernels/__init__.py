"""mazo_kernels: fused, bit-reproducible kernels for zeroth-order (MeZO / Sparse MeZO / MaZO) fine-tuning."""
from .version import __version__
from .reference import SPEC_VERSION
from .plan import PlanEntry, ZOPlan, stable_tensor_id, canonical_name
from .masks import BitMask, RowIndexMask, ThresholdMask
from .api import noise, perturb_, perturbed_copy, update_
from ._backends import BackendUnavailable, has_cpu, has_cuda, has_triton

__all__ = ["__version__", "SPEC_VERSION", "PlanEntry", "ZOPlan", "stable_tensor_id", "canonical_name", "BitMask",
           "RowIndexMask", "ThresholdMask", "noise", "perturb_", "perturbed_copy", "update_", "BackendUnavailable",
           "has_cpu", "has_cuda", "has_triton"]

# Mask construction: Sparse MeZO thresholds, MaZO importance masks, the mask file.
from .sparse_mezo import magnitude_threshold, sparse_mezo_masks
from .importance import ActivationScorer, GradientScorer, combine_task_scores, row_normalize
from .mask_builder import (MaskDict, MaskInfo, build_mazo_masks, density_to_k, load_masks, mazo_masks, save_masks,
                         topk_columns)

__all__ += ["magnitude_threshold", "sparse_mezo_masks", "ActivationScorer", "GradientScorer", "combine_task_scores",
            "row_normalize", "MaskDict", "MaskInfo", "build_mazo_masks", "density_to_k", "load_masks", "mazo_masks",
            "save_masks", "topk_columns"]

# The ZO optimizer, its seed log and replay.
from .optim import ZOSGD, step_seeds
from .seed_log import SeedLog, replay
from .cuda_graph import GraphedZOStep

__all__ += ["ZOSGD", "step_seeds", "SeedLog", "replay", "GraphedZOStep"]

# Tasks (JSONL task files, sampler, answer loss, scoring). ZOTrainer / ZOArguments need transformers, which is an
# optional dependency and slow to import: they load on first access.
from .tasks import Example, MultiTaskSampler, TaskFormatError, evaluate, load_task_file, load_tasks, score_choices

__all__ += ["Example", "MultiTaskSampler", "TaskFormatError", "evaluate", "load_task_file", "load_tasks",
            "score_choices", "ZOTrainer", "ZOArguments"]


def __getattr__(name):
    if name in ("ZOTrainer", "ZOArguments"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'mazo_kernels' has no attribute {name!r}")
