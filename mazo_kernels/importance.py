"""Which weights get masks, and how MaZO scores them (docs/MASKS.md gives the formulas and the memory budget).

Two scorers, one contract: ``names`` (the scored weights, all 2-D), ``param(name)`` (the live parameter),
``num_tasks`` and ``combined_score(name)`` (float32 ``[rows, cols]``: the sum over tasks of the row-normalised task
scores). ``mazo_masks`` turns any object with that contract into masks, one weight at a time, so at no point does
a whole model's worth of scores exist outside the scorer's own accumulators.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

# Used only when the weights come as (name, tensor) pairs, so there is no module structure to look at.
EMBEDDING_NAME_PATTERNS = ("*embed_tokens*", "*embed_positions*", "*word_embeddings*", "*wte.*", "*wpe.*",
                           "*lm_head*", "*embed_out*")


# ---------------------------------------------------------------------------------------------------- selection
def _named_tensors(source):
    """(name, tensor) pairs, tied weights once, plus the module when there is one (for structural rules)."""
    if isinstance(source, nn.Module):
        return list(source.named_parameters()), source
    if isinstance(source, Mapping):
        items = list(source.items())
    else:
        items = list(source)
    seen, out = set(), []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"weights entry {i}: expected a (name, tensor) pair, got {type(item).__name__}")
        if id(item[1]) not in seen:
            seen.add(id(item[1]))
            out.append(item)
    return out, None


def _embedding_param_ids(module) -> set:
    """Parameters of nn.Embedding modules and of a transformers model's output embeddings (lm_head)."""
    ids = set()
    if module is None:
        return ids
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            ids.update(id(p) for p in m.parameters(recurse=False))
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            ids.update(id(p) for p in out.parameters(recurse=False))
    return ids


def _as_rule(rule, what):
    """None, a glob pattern, a list of glob patterns (fnmatch, whole name), or a callable(name, tensor) -> bool."""
    if rule is None:
        return None, []
    if callable(rule):
        return rule, []
    pats = [rule] if isinstance(rule, str) else list(rule)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a glob pattern, a list of them, or a callable(name, tensor); "
                            f"got {type(p).__name__} in the list")
    return (lambda name, t: any(fnmatch.fnmatchcase(name, p) for p in pats)), pats


def select_weights(source, *, names=None, include=None, exclude=None, dims=(2,), exclude_embeddings=False,
                   trainable_only=True, what="mask") -> dict:
    """Pick the weights that get masks. Returns {name: tensor} in the source's parameter order.

    source: an nn.Module (named_parameters(), tied weights once) or (name, tensor) pairs / a dict.
    names: an explicit list; every name must exist (else ValueError naming it); the other filters except ``dims``
      are then ignored, and a named weight whose rank is not in ``dims`` is an error rather than a silent skip.
    include / exclude: glob pattern(s) matched against the whole name (fnmatch), or callable(name, tensor) -> bool.
      A pattern that matches no weight at all is an error: it is almost always a typo.
    dims: tensor ranks that get masks (default 2-D weight matrices only; ``(1, 2)`` adds norms and biases).
    exclude_embeddings: leave out nn.Embedding weights and the model's output embeddings (``get_output_embeddings``,
      i.e. lm_head); for bare (name, tensor) pairs, names matching EMBEDDING_NAME_PATTERNS.
    trainable_only: for a module, skip parameters with requires_grad=False (they are not trained anyway).
    """
    pairs, module = _named_tensors(source)
    by_name = dict(pairs)
    if names is not None:
        if isinstance(names, str):
            names = [names]
        out = {}
        for n in names:
            if n not in by_name:
                raise ValueError(f"unknown parameter name {n!r} (not among the {len(by_name)} weights given)")
            t = by_name[n]
            if t.dim() not in dims:
                raise ValueError(f"{n!r} has shape {tuple(t.shape)}; {what} takes {_dims_words(dims)} weights")
            out[n] = t
        return {n: out[n] for n, _ in pairs if n in out}
    inc, inc_pats = _as_rule(include, "include")
    exc, exc_pats = _as_rule(exclude, "exclude")
    for p in inc_pats + exc_pats:
        if not any(fnmatch.fnmatchcase(n, p) for n in by_name):
            raise ValueError(f"pattern {p!r} matches no parameter name")
    emb = _embedding_param_ids(module) if exclude_embeddings else set()
    out = {}
    for n, t in pairs:
        if t.dim() not in dims:
            continue
        if module is not None and trainable_only and not t.requires_grad:
            continue
        if exclude_embeddings:
            if module is not None and id(t) in emb:
                continue
            if module is None and any(fnmatch.fnmatchcase(n, p) for p in EMBEDDING_NAME_PATTERNS):
                continue
        if inc is not None and not inc(n, t):
            continue
        if exc is not None and exc(n, t):
            continue
        out[n] = t
    return out


def _dims_words(dims):
    return " or ".join(f"{d}-D" for d in dims)


# ---------------------------------------------------------------------------------------------------- formulas
def row_normalize(s: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum (float32); a row whose sum is 0 stays 0.

    Scores are non-negative, so after this each row of a task is that task's share of the row's importance, summing
    to 1: a task with larger gradients or activations gets the same vote per row as any other. L1 rather than L2,
    because the per-row top-k is a budget split inside a row and shares add up to the budget; under L2 a task whose
    importance is spread over many columns would outvote a task that concentrates it.
    """
    s = s.to(torch.float32)
    r = s.sum(dim=1, keepdim=True)
    return torch.where(r > 0, s / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(s))


def combine_task_scores(task_scores) -> torch.Tensor:
    """S = sum_t row_normalize(S_t), summed in task order in float32."""
    task_scores = list(task_scores)
    if not task_scores:
        raise ValueError("combine_task_scores needs the scores of at least one task")
    shape = task_scores[0].shape
    acc = None
    for t, s in enumerate(task_scores):
        if s.dim() != 2 or s.shape != shape:
            raise ValueError(f"task {t}: scores must be 2-D of one shape {tuple(shape)}, got {tuple(s.shape)}")
        n = row_normalize(s)
        acc = n if acc is None else acc.add_(n)
    return acc


def gradient_task_score(w, mean_g, mean_g2, alpha=1.0, beta=0.0) -> torch.Tensor:
    """S_t = |E[g]·w| + alpha·½·E[g²]·w² + beta·|w| (float32).

    Zeroing w changes the loss by -g·w + ½·H·w² + O(w³) (Taylor). The first term, with the gradient averaged over
    the task's batches, is the first-order importance; the second uses the empirical Fisher E[g²] as the Hessian
    diagonal (it is the Gauss-Newton diagonal for log-likelihood losses, and the only second-order quantity that
    costs no more than a gradient). |w| is a magnitude prior.
    """
    w = w.to(torch.float32)
    s = (mean_g.to(torch.float32) * w).abs_()
    if alpha:
        s.add_(mean_g2.to(torch.float32) * w * w, alpha=0.5 * alpha)
    if beta:
        s.add_(w.abs(), alpha=beta)
    return s


def _check_coeff(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {x!r}")
    return float(x)


def default_loss_fn(model, batch):
    """transformers convention: model(**batch).loss (the batch carries labels)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"the default loss_fn calls model(**batch) and needs a dict batch, got {type(batch).__name__};"
                        " pass loss_fn=(model, batch) -> loss")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("model(**batch) returned no loss; put labels in the batch or pass loss_fn")
    return loss


def default_forward_fn(model, batch):
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@contextlib.contextmanager
def _scoring_mode(model):
    """eval() so dropout does not add noise to the scores; the previous mode is restored."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class _ScorerBase:
    def __init__(self, model, *, names, include, exclude, exclude_embeddings, what):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self._params = select_weights(model, names=names, include=include, exclude=exclude, dims=(2,),
                                      exclude_embeddings=exclude_embeddings, trainable_only=names is None, what=what)
        if not self._params:
            raise ValueError(f"{type(self).__name__}: no 2-D weights selected")
        self.num_tasks = 0
        self.task_names = []

    @property
    def names(self):
        return list(self._params)

    def param(self, name):
        return self._params[name]

    def _check_name(self, name):
        if name not in self._params:
            raise ValueError(f"unknown parameter name {name!r}: not scored by this {type(self).__name__}")

    def combined_score(self, name) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- gradient
class GradientScorer(_ScorerBase):
    """MaZO importance from gradients: S_t = |E_b[g]·w| + alpha·½·E_b[g²]·w² + beta·|w|, row-normalised, summed.

    Memory. Each gradient is consumed by a post-accumulate-grad hook as autograd produces it and then dropped
    (p.grad = None), so at most the gradients of the tensors autograd is finishing at that moment exist at once,
    never a model's worth. Per scored weight the scorer keeps, on ``device`` in ``dtype``:
      - while a task is scored: running sums of g and of g² (2 values),
      - always: one cross-task accumulator (1 value), into which each finished task is folded;
    i.e. 3 values per weight whatever the number of tasks: 12 B (float32) or 6 B (bfloat16), on the host by default
    (``device="cpu"``; ``pin_memory=True`` for faster device-to-host copies). For LLaMA-7B (6.48e9 scored weights
    without the embeddings): 78 GB host float32, 39 GB bfloat16; or 39 GB on the GPU beside the 13.5 GB of bf16
    weights with ``device="cuda", dtype=torch.bfloat16`` (docs/MASKS.md has the full budget).

    score_task runs the model in eval() mode, gives requires_grad=True to the scored weights and False to every
    other parameter for its duration (so unscored parameters get no gradients at all), discards any .grad the
    scored weights had, and restores modes and flags afterwards.
    """

    def __init__(self, model, alpha=1.0, beta=0.0, *, device="cpu", dtype=torch.float32, pin_memory=False,
                 names=None, include=None, exclude=None, exclude_embeddings=True):
        super().__init__(model, names=names, include=include, exclude=exclude,
                         exclude_embeddings=exclude_embeddings, what="GradientScorer")
        self.alpha = _check_coeff(alpha, "alpha")
        self.beta = _check_coeff(beta, "beta")
        if dtype not in (torch.float32, torch.bfloat16):
            # not float16: squared LLM gradients (~1e-12) underflow its range; bfloat16 has float32's exponent
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu" and torch.cuda.is_available()
        self._acc = {}

    @property
    def bytes_per_weight(self) -> int:
        """Peak scorer-owned bytes per scored weight: sum g, sum g², cross-task accumulator."""
        return 3 * torch.empty((), dtype=self.dtype).element_size()

    def _zeros(self, t):
        return torch.zeros(t.shape, dtype=self.dtype, device=self.device, pin_memory=self.pin_memory)

    def score_task(self, batches: Iterable, loss_fn: Callable | None = None, *, task=None) -> int:
        """Score one task on ``batches``; loss_fn(model, batch) -> scalar loss (default: model(**batch).loss).

        Returns the number of batches used. E_b is the mean over these batches of the per-batch gradient.
        """
        loss_fn = default_loss_fn if loss_fn is None else loss_fn
        params = self._params
        sum_g = {n: self._zeros(p) for n, p in params.items()}
        sum_g2 = {n: self._zeros(p) for n, p in params.items()}
        scored = {id(p) for p in params.values()}
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = []
        seen = set()

        def make_hook(name):
            def hook(p):
                g = p.grad
                p.grad = None
                if g is None:
                    return
                seen.add(name)
                g = g.detach().to(self.device, non_blocking=False).to(torch.float32)
                sum_g[name].add_(g)
                sum_g2[name].add_(g * g)
            return hook

        count = 0
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in scored)
            for n, p in params.items():
                p.requires_grad_(True)
                p.grad = None
                handles.append(p.register_post_accumulate_grad_hook(make_hook(n)))
            with _scoring_mode(self.model), torch.enable_grad():
                for batch in batches:
                    loss = loss_fn(self.model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                        raise TypeError(f"loss_fn must return a one-element loss tensor, got {got}")
                    if not bool(torch.isfinite(loss.detach()).all()):
                        raise ValueError(f"loss of batch {count} is {float(loss.detach())}; "
                                         "scores would be meaningless")
                    if not loss.requires_grad:
                        raise ValueError("the loss does not depend on any scored weight")
                    loss.reshape(()).backward()
                    count += 1
        finally:
            for h in handles:
                h.remove()
            for p, rg in flags:
                p.requires_grad_(rg)
                if id(p) in scored:
                    p.grad = None
        if count == 0:
            raise ValueError("score_task got no batches")
        missing = [n for n in params if n not in seen]
        if missing:
            # e.g. reentrant activation checkpointing with frozen embeddings, or a branch the loss never uses:
            # these weights are then scored by beta·|w| alone
            warnings.warn(f"score_task: no gradient reached {len(missing)} scored weight(s), e.g. {missing[:3]}; "
                          "with reentrant gradient checkpointing call model.enable_input_require_grads()",
                          stacklevel=2)
        for n, p in params.items():
            w = p.detach().to(self.device)
            s = gradient_task_score(w, sum_g[n].to(torch.float32) / count, sum_g2[n].to(torch.float32) / count,
                                    self.alpha, self.beta)
            del sum_g[n], sum_g2[n]
            s = row_normalize(s)
            if n in self._acc:
                if self.dtype == torch.float32:
                    self._acc[n].add_(s)
                else:
                    self._acc[n].copy_(self._acc[n].to(torch.float32).add_(s))
            else:
                self._acc[n] = self._zeros(p).copy_(s)
        self.num_tasks += 1
        self.task_names.append(task if task is not None else f"task{self.num_tasks - 1}")
        return count

    def combined_score(self, name) -> torch.Tensor:
        self._check_name(name)
        if not self.num_tasks:
            raise ValueError("no task scored yet: call score_task first")
        return self._acc[name].to(torch.float32)


# ---------------------------------------------------------------------------------------------------- activation
class ActivationScorer(_ScorerBase):
    """Forward-only MaZO importance (Wanda-style): S_t[i, j] = |W_ij|·‖x_j‖₂ over task t's tokens,
    row-normalised, summed over tasks. For models where a backward pass does not fit.

    A forward hook on each scored nn.Linear adds Σ_tokens x_j² per input feature j. Only the per-task vectors of
    input-feature norms are kept ([in_features] float32 per Linear per task: 4·T/out_features bytes per weight,
    ~0 for LLM shapes); |W| is read when the masks are built, so the weights must not change in between.
    ``combined_score`` computes one weight's T task scores transiently (2 float32 copies of that weight).

    Only nn.Linear weights are scored. transformers' Conv1D (GPT-2) stores its weight as [in, out], so a row of it
    is one input feature: the activation factor is constant along the row, the row normalisation cancels it, and
    per-row top-k would reduce to plain magnitude. Such weights are refused rather than scored misleadingly.
    Every token position the forward sees counts, padding included (the hook cannot see the attention mask);
    batch without padding, or pass forward_fn that strips it, when that matters.
    """

    def __init__(self, model, *, names=None, include=None, exclude=None, exclude_embeddings=True):
        super().__init__(model, names=names, include=include, exclude=exclude,
                         exclude_embeddings=exclude_embeddings, what="ActivationScorer")
        by_id = {}
        for mname, m in model.named_modules():
            if isinstance(m, nn.Linear) and m.weight is not None:
                by_id.setdefault(id(m.weight), []).append(m)
        self._modules = {}
        for n, p in self._params.items():
            if id(p) not in by_id:
                if names is not None:
                    raise ValueError(f"{n!r} is not the weight of an nn.Linear; ActivationScorer scores only those")
                continue
            self._modules[n] = by_id[id(p)]
        self._params = {n: p for n, p in self._params.items() if n in self._modules}
        if not self._params:
            raise ValueError("ActivationScorer: no nn.Linear weights selected")
        self._norms = []   # per task: {name: float32 [in_features] = ‖x_j‖₂}

    @property
    def bytes_per_weight(self) -> float:
        """Scorer-owned bytes per scored weight after num_tasks tasks (the input-norm vectors)."""
        total = sum(p.numel() for p in self._params.values())
        per = sum(4 * p.shape[1] for p in self._params.values()) * max(1, self.num_tasks)
        return per / total

    def score_task(self, batches: Iterable, forward_fn: Callable | None = None, *, task=None) -> int:
        """Run forward_fn(model, batch) (default: model(**batch), or model(batch) for a tensor) under no_grad."""
        forward_fn = default_forward_fn if forward_fn is None else forward_fn
        sumsq = {n: torch.zeros(p.shape[1], dtype=torch.float32, device=p.device) for n, p in self._params.items()}
        handles = []

        def make_hook(name):
            def hook(mod, args, out):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.float32)
                sumsq[name].add_((x * x).sum(dim=0).to(sumsq[name].device))
            return hook

        count = 0
        try:
            for n, mods in self._modules.items():
                for m in mods:
                    handles.append(m.register_forward_hook(make_hook(n)))
            with _scoring_mode(self.model), torch.no_grad():
                for batch in batches:
                    forward_fn(self.model, batch)
                    count += 1
        finally:
            for h in handles:
                h.remove()
        if count == 0:
            raise ValueError("score_task got no batches")
        for n, s in sumsq.items():
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"input activations of {n!r} are not finite")
        self._norms.append({n: s.sqrt() for n, s in sumsq.items()})
        self.num_tasks += 1
        self.task_names.append(task if task is not None else f"task{self.num_tasks - 1}")
        return count

    def task_score(self, name, t) -> torch.Tensor:
        """S_t = |W| · ‖x‖₂ (broadcast over rows), float32."""
        self._check_name(name)
        w = self._params[name].detach().to(torch.float32).abs()
        return w * self._norms[t][name].to(w.device).unsqueeze(0)

    def combined_score(self, name) -> torch.Tensor:
        self._check_name(name)
        if not self.num_tasks:
            raise ValueError("no task scored yet: call score_task first")
        return combine_task_scores(self.task_score(name, t) for t in range(self.num_tasks))
