"""transformers integration: ZOArguments, masks by method, and ZOTrainer (a Trainer whose step is a ZO step).

ZOTrainer keeps everything the Trainer gives (data loading, LR schedules, logging, callbacks, checkpoints, PEFT
models) and replaces only the step: no backward, no gradients, no gradient clipping; ZOSGD perturbs, runs the
loss twice, and updates the trainable parameters (for a PEFT model, only its adapters).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from transformers import Trainer

from . import tasks as T

METHODS = ("mezo", "sparse-mezo", "mazo")
DEFAULT_SPARSITY = 0.75     # Sparse MeZO: the largest 75% of each weight matrix is frozen
DEFAULT_DENSITY = 0.1       # MaZO: 10% of each weight matrix's elements (per row) are trained


@dataclass
class ZOArguments:
    """ZO settings beside transformers.TrainingArguments (which keep lr, schedule, batch size, steps, seed).

    method: "mezo" (all trainable weights), "sparse-mezo" (magnitude-threshold masks: ``sparsity`` of each weight
        matrix, its largest entries, is frozen) or "mazo" (importance masks from a few batches per task:
        ``density`` of each weight matrix is trained).
    eps: perturbation size. dist: "gaussian" | "gaussian_fast" (spec v2) | "rademacher". num_perturbations:
        directions per step (q).
    estimator: "two_sided" | "one_sided". sign: update with sign(g). rounding: None (stochastic for bf16/fp16) |
        "nearest" | "stochastic". mode: "inplace" | "transient". forward_mode: "eval" (dropout off during the ZO
        forwards, as MeZO does) | "train" (the same dropout masks for both forwards of a step).
    seed: the ZO base seed (None: TrainingArguments.seed). backend: kernel backend ("auto", "cpu", "cuda", ...).
    mask_batches: batches per task that MaZO scores; mask_scorer: "gradient" | "activation".
    unmasked: what happens to trainable weights that get no mask under sparse-mezo/mazo (norms, biases, and for
        MaZO the embeddings and lm_head): "freeze" (default: only the masked elements train, so sparsity/density mean
        what they say) or "train" (densely).
    score_reduction: choice scoring in evaluation, "mean" | "sum" token log-probability.
    replica_check_every: under a distributed launch (data parallel), steps between the checks that the replicas
        are still bit-identical (0: never; docs/DISTRIBUTED.md).
    lookahead: ZOSGD(lookahead=True), two passes per step (mode "inplace", estimator "two_sided"); the trainer settles
        the carried perturbation before every evaluation and checkpoint and at the end of train() (docs/OPTIMIZER.md).
    """
    method: str = "mezo"
    eps: float = 1e-3
    sparsity: float | None = None
    density: float | None = None
    dist: str = "gaussian"
    num_perturbations: int = 1
    estimator: str = "two_sided"
    sign: bool = False
    rounding: str | None = None
    mode: str = "inplace"
    forward_mode: str = "eval"
    seed: int | None = None
    backend: str = "auto"
    mask_batches: int = 4
    mask_scorer: str = "gradient"
    unmasked: str = "freeze"
    score_reduction: str = "mean"
    replica_check_every: int = 100
    lookahead: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ZOArguments.method must be one of {list(METHODS)}, got {self.method!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"ZOArguments.eps must be finite and > 0, got {self.eps!r}")
        if self.sparsity is not None and self.method != "sparse-mezo":
            raise ValueError(f"ZOArguments.sparsity applies to method 'sparse-mezo', not {self.method!r}")
        if self.density is not None and self.method != "mazo":
            raise ValueError(f"ZOArguments.density applies to method 'mazo', not {self.method!r}")
        if self.method == "sparse-mezo":
            self.sparsity = DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"ZOArguments.sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.method == "mazo":
            self.density = DEFAULT_DENSITY if self.density is None else self.density
            if not 0 < self.density <= 1:
                raise ValueError(f"ZOArguments.density must be in (0, 1], got {self.density!r}")
        if isinstance(self.mask_batches, bool) or not isinstance(self.mask_batches, int) or self.mask_batches < 1:
            raise ValueError(f"ZOArguments.mask_batches must be an int >= 1, got {self.mask_batches!r}")
        if self.mask_scorer not in ("gradient", "activation"):
            raise ValueError(f"ZOArguments.mask_scorer must be 'gradient' or 'activation', got {self.mask_scorer!r}")
        if self.unmasked not in ("train", "freeze"):
            raise ValueError(f"ZOArguments.unmasked must be 'train' or 'freeze', got {self.unmasked!r}")
        if isinstance(self.replica_check_every, bool) or not isinstance(self.replica_check_every, int) \
                or self.replica_check_every < 0:
            raise ValueError(f"ZOArguments.replica_check_every must be an int >= 0, got {self.replica_check_every!r}")
        if not isinstance(self.lookahead, bool):
            raise ValueError(f"ZOArguments.lookahead must be True or False, got {self.lookahead!r}")
        if self.lookahead and (self.mode != "inplace" or self.estimator != "two_sided"):
            raise ValueError("ZOArguments.lookahead needs mode='inplace' and estimator='two_sided', got "
                             f"mode={self.mode!r}, estimator={self.estimator!r}")
        if self.score_reduction not in T.REDUCTIONS:
            raise ValueError(f"ZOArguments.score_reduction must be one of {list(T.REDUCTIONS)}, "
                             f"got {self.score_reduction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_named_parameters(model) -> list:
    """(name, parameter) for every distinct parameter with requires_grad (tied weights once, first name)."""
    seen, out = set(), []
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    if not out:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return out


def task_batches_for_masks(tasks: Mapping[str, Sequence[T.Example]], tokenizer, *, batch_size: int,
                           n_batches: int, max_length: int | None = None) -> dict:
    """{task: [training batch, ...]}: the first ``n_batches`` batches of each task, for MaZO's importance scores."""
    out = {}
    for name, exs in tasks.items():
        exs = list(exs)[:batch_size * n_batches]
        out[name] = [T.training_batch(tokenizer, exs[i:i + batch_size], max_length=max_length)
                     for i in range(0, len(exs), batch_size)]
    return out


def _batch_on(model, batch):
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_masks(model, zo: ZOArguments, *, task_batches: Mapping | None = None, loss_fn=None) -> dict | None:
    """The masks ``zo.method`` asks for, over the model's trainable weight matrices (None for MeZO).

    mazo needs ``task_batches`` ({task: [batch, ...]}); loss_fn(model, batch) defaults to tasks.batch_loss.
    With ``zo.unmasked == "freeze"`` the trainable parameters that get no mask are set to requires_grad=False."""
    if zo.method == "mezo":
        return None
    if zo.method == "sparse-mezo":
        from .sparse_mezo import sparse_mezo_masks
        masks = sparse_mezo_masks(model, zo.sparsity)
    else:
        from .mask_builder import build_mazo_masks
        if not task_batches:
            raise ValueError("method 'mazo' needs task batches to score importance: pass mask_batches= "
                             "({task: [batch, ...]}), masks=, or a TaskDataset / MixedTaskDataset as train_dataset")
        fn = loss_fn or (lambda m, b: T.batch_loss(m, _batch_on(m, b)))
        masks = build_mazo_masks(model, task_batches, zo.density, scorer=zo.mask_scorer, loss_fn=fn,
                                 forward_fn=lambda m, b: m(**T.model_inputs(m, b)))
    if not masks:
        raise ValueError(f"method {zo.method!r} selected no weight matrices to mask among the trainable parameters")
    if zo.unmasked == "freeze":
        for n, p in trainable_named_parameters(model):
            if n not in masks:
                p.requires_grad_(False)
    return masks


def make_zo_optimizer(model, zo: ZOArguments, *, lr: float, weight_decay: float = 0.0, masks=None,
                      decay_parameter_names=None, seed: int = 0, optimizer_class=None):
    """ZOSGD over the model's trainable parameters (so a PEFT model trains only its adapters).

    weight_decay applies to ``decay_parameter_names`` (default: every trainable parameter but biases and norms)."""
    if optimizer_class is None:
        from .optim import ZOSGD as optimizer_class
    named = trainable_named_parameters(model)
    if decay_parameter_names is None:
        decay_parameter_names = {n for n, p in named if p.dim() >= 2 and "norm" not in n.lower()}
    decay = [(n, p) for n, p in named if n in decay_parameter_names]
    rest = [(n, p) for n, p in named if n not in decay_parameter_names]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return optimizer_class(groups, lr=lr, eps=zo.eps, weight_decay=weight_decay, dist=zo.dist,
                           estimator=zo.estimator, num_perturbations=zo.num_perturbations, sign=zo.sign,
                           rounding=zo.rounding, masks=masks, mode=zo.mode, module=model,
                           forward_mode=zo.forward_mode, seed=zo.seed if zo.seed is not None else seed,
                           backend=zo.backend, lookahead=zo.lookahead)


_TRAINER_OPT_CLASS = None


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if _distributed() else 1


def _trainer_optimizer_class():
    """ZOSGD whose closure-less step() does nothing.

    Trainer's loop calls ``optimizer.step()`` after ``training_step`` returns. ZOTrainer.training_step must return
    the step's loss, so it runs the whole ZO step itself (``step(closure)``); the loop's closure-less call that
    follows is then a no-op, never a second update."""
    global _TRAINER_OPT_CLASS
    if _TRAINER_OPT_CLASS is None:
        from .optim import ZOSGD

        class TrainerZOSGD(ZOSGD):
            def step(self, closure=None):
                if closure is None:
                    return None
                return super().step(closure)

        _TRAINER_OPT_CLASS = TrainerZOSGD
    return _TRAINER_OPT_CLASS


class ZOTrainer(Trainer):
    """transformers.Trainer with a zeroth-order step.

        trainer = ZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6, max_steps=1000),
                            zo_args=ZOArguments(method="mezo", eps=1e-3), train_dataset=TaskDataset(examples),
                            data_collator=TaskCollator(tokenizer), processing_class=tokenizer,
                            eval_tasks={"sst2": dev_examples})
        trainer.train()

    - The optimizer is ZOSGD over the trainable parameters (create_optimizer), with TrainingArguments'
      learning_rate / weight_decay and its LR scheduler; masks come from ``zo_args.method`` (or ``masks=``).
    - training_step runs ZOSGD.step(closure), closure = compute_loss on the batch (ZOSGD runs it under inference_mode,
      twice); no backward runs and no .grad is ever populated. Gradient accumulation and fp16 mixed precision
      (a GradScaler needs gradients) are refused.
    - Under a distributed launch (torchrun / accelerate launch, one process per device) the run is ZO data
      parallel: each process evaluates its shard of the batch, one all-gather of the loss pair per step combines
      the losses (mazo_kernels.distributed.data_parallel), and the replicas stay bit-identical. The model is not
      wrapped in DistributedDataParallel (_wrap_model): there are no gradients to synchronise, and DDP's buffer
      broadcast would add collectives. Trainer-managed FSDP and DeepSpeed are refused (for sharded weights, apply
      fully_shard yourself and use ZOSGD: docs/DISTRIBUTED.md).
    - evaluate(): with ``eval_tasks`` ({task: [Example, ...]}), per-task choice accuracy and loss
      (tasks.evaluate_tasks); otherwise the Trainer's own evaluation.
    """

    def __init__(self, model=None, args=None, *pos, zo_args: ZOArguments | None = None, masks: dict | None = None,
                 mask_batches: Mapping | None = None, eval_tasks: Mapping | None = None, **kwargs):
        if args is not None:
            if args.gradient_accumulation_steps != 1:
                raise ValueError("ZOTrainer: gradient_accumulation_steps must be 1 (a ZO step has no gradients to "
                                 f"accumulate; use a larger batch instead), got {args.gradient_accumulation_steps}")
            if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
                raise ValueError("ZOTrainer: Trainer-managed FSDP / DeepSpeed is not supported (ZO data parallelism "
                                 "needs no wrapper); for sharded weights apply torch.distributed.fsdp.fully_shard to "
                                 "the model and train it with ZOSGD (docs/DISTRIBUTED.md)")
            if args.fp16:
                raise ValueError("ZOTrainer: fp16=True (mixed precision with a GradScaler) needs gradients; load the "
                                 "model in float16/bfloat16 instead and leave fp16/bf16 off")
        if eval_tasks is not None and kwargs.get("eval_dataset") is None:
            # The Trainer checks that an eval dataset exists before it schedules evaluations; ours is eval_tasks.
            kwargs["eval_dataset"] = T.TaskDataset([e for exs in eval_tasks.values() for e in exs])
        super().__init__(model, args, *pos, **kwargs)
        self.zo_args = zo_args if zo_args is not None else ZOArguments()
        self.zo_masks = masks
        self.zo_mask_batches = mask_batches
        self.eval_tasks = eval_tasks
        self.zo_optimizer = None
        self._zo_aliases_checked = False

    # ---------------------------------------------------------------- optimizer
    def _tasks_of_train_dataset(self):
        ds = self.train_dataset
        if isinstance(ds, T.MixedTaskDataset):
            return ds.tasks
        if isinstance(ds, T.TaskDataset):
            out = {}
            for e in ds.examples:
                out.setdefault(e.task, []).append(e)
            return out
        return None

    def _masks(self):
        if self.zo_masks is not None or self.zo_args.method == "mezo":
            return self.zo_masks
        batches = self.zo_mask_batches
        if batches is None and self.zo_args.method == "mazo":
            tasks = self._tasks_of_train_dataset()
            tok = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
            if tasks is not None and tok is not None:
                batches = task_batches_for_masks(tasks, tok, batch_size=self.args.per_device_train_batch_size,
                                                 n_batches=self.zo_args.mask_batches)
        self.zo_masks = build_masks(self.model, self.zo_args, task_batches=batches)
        if self.zo_masks is not None and _world_size() > 1:
            from .distributed import sync_masks
            sync_masks(self.zo_masks)          # gradient scores on GPUs can differ in the last bits between ranks
        return self.zo_masks

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            model = self.model
            decay = set(self.get_decay_parameter_names(model)) if self.args.weight_decay > 0 else set()
            self.zo_optimizer = make_zo_optimizer(
                model, self.zo_args, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                masks=self._masks(), decay_parameter_names=decay, seed=self.args.seed,
                optimizer_class=_trainer_optimizer_class())
            if _distributed():
                from .distributed import data_parallel
                data_parallel(self.zo_optimizer, check_every=self.zo_args.replica_check_every)
            self.optimizer = self.zo_optimizer
        return self.optimizer

    def _wrap_model(self, model, training=True, dataloader=None):
        """No DistributedDataParallel: a ZO step has no gradients to all-reduce, and DDP would broadcast buffers
        before every forward (collectives beyond the one all-gather of the losses). Under a distributed launch the
        model (already placed on args.device by Trainer.__init__) is marked as prepared, so the Trainer's
        accelerator.prepare(model, optimizer) leaves it as it is: no wrapper, no move (a move after the optimizer
        is built could re-allocate the weights the optimizer's plan points at), no autocast."""
        if training and _distributed():
            model._is_accelerate_prepared = True
            return model
        return super()._wrap_model(model, training, dataloader)

    # ---------------------------------------------------------------- the step
    def _check_plan_aliases_model(self):
        """Once: the optimizer's plan must point at the model's current weights (a move or re-allocation after
        create_optimizer would leave it perturbing stale copies while the forwards see unchanged weights)."""
        from .optim import is_dtensor
        current = {}
        for n, p in self.model.named_parameters():
            current.setdefault(p.data_ptr() if not is_dtensor(p) else p.to_local().data_ptr(), n)
        stale = [e.name for pt in self.zo_optimizer._parts for e in pt.plan.entries
                 if e.tensor.numel() and e.tensor.data_ptr() not in current]
        if stale:
            raise RuntimeError(f"ZOTrainer: the weights of {stale[:3]} were re-allocated after the ZO optimizer was "
                               "built (e.g. a .to(device) after create_optimizer); build the optimizer after the "
                               "model is placed")
        self._zo_aliases_checked = True

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        if self.zo_optimizer is None:
            raise RuntimeError("ZOTrainer: the optimizer was given from outside; ZOTrainer builds its own ZOSGD "
                               "(do not pass optimizers=)")
        if not self._zo_aliases_checked:
            self._check_plan_aliases_model()
        model.train()           # as Trainer.training_step does; ZOSGD switches to eval() for forward_mode="eval"
        inputs = self._prepare_inputs(inputs)

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        loss = self.zo_optimizer.step(closure)
        return loss.detach().to(self.args.device)

    # ---------------------------------------------------------------- lookahead: weights without the carried +eps
    def _settle(self):
        """ZOArguments.lookahead: between steps the weights carry the next step's +eps perturbation; evaluations,
        checkpoints and the trained model must see the weights themselves."""
        if self.zo_optimizer is not None:
            self.zo_optimizer.settle()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._settle()

    def _save_checkpoint(self, *args, **kwargs):
        self._settle()
        return super()._save_checkpoint(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        self._settle()
        return super().save_model(*args, **kwargs)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._settle()
        if self.eval_tasks is None or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        tok = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError("ZOTrainer.evaluate with eval_tasks needs the tokenizer: pass processing_class=")
        res = T.evaluate_tasks(self.model, tok, self.eval_tasks, batch_size=self.args.per_device_eval_batch_size,
                               reduction=self.zo_args.score_reduction)
        metrics = {f"{metric_key_prefix}_mean_accuracy": res["mean_accuracy"]}
        for name, r in res["tasks"].items():
            metrics[f"{metric_key_prefix}_{name}_accuracy"] = r["accuracy"]
            metrics[f"{metric_key_prefix}_{name}_loss"] = r["loss"]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


__all__ = ["ZOArguments", "ZOTrainer", "METHODS", "build_masks", "make_zo_optimizer", "task_batches_for_masks",
           "trainable_named_parameters"]
