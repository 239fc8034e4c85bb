"""Fine-tuning runs on choice tasks: the loop behind the demo and bench/real_tasks.py.

One function, ``run(model, tokenizer, train_tasks, eval_sets, RunConfig(...))``, trains with one method and returns
a record (per-step loss, evaluations, wall time, peak memory):

| method | what trains | optimizer |
|---|---|---|
| ``zeroshot`` | nothing | evaluation only |
| ``mezo`` | every weight (dense ZO) | ``ZOSGD`` |
| ``sparse-mezo`` | the small ``1 - sparsity`` of each weight matrix (Sparse MeZO thresholds); the rest frozen | ``ZOSGD`` + ``ThresholdMask`` |
| ``mazo`` | ``density`` of each weight matrix, top-k per row of the multi-task importance (MaZO); the rest frozen | ``ZOSGD`` + ``build_mazo_masks`` |
| ``mezo-naive`` | every weight | MeZO's own in-place loop with torch ops (``+eps z, -2 eps z, +eps z``, round-to-nearest update), for the bf16 numerics comparison |
| ``adamw`` | every weight, backprop | ``torch.optim.AdamW``: the first-order reference |

The training loss (``RunConfig.loss``) is by default MeZO's for classification tasks (its
``--train_as_classification``): every choice is scored by the mean log-probability of its tokens given the prompt,
and the loss is the cross-entropy of the correct choice over the choices' scores (``choice_loss``; a batch of E
examples is one forward over all their choices). ``loss="answer"`` is LM-style teacher forcing instead, the
cross-entropy of the correct answer's tokens (``answer_loss``, equal to ``tasks.batch_loss``). Evaluation scores
every choice the same way and takes the argmax (``evaluate``, equal to ``tasks.evaluate`` on choice examples). Both
apply the output layer only at the positions that predict answer tokens. A ZO step runs two forwards, an AdamW step one
forward and one backward; ``RunConfig.steps`` counts steps, and the record counts forwards.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import tasks as T

ZO_METHODS = ("mezo", "sparse-mezo", "mazo", "mezo-naive")
METHODS = ("zeroshot",) + ZO_METHODS + ("adamw",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------- loss, scoring
def _output_layer(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (lm_head)")
    return head


def _hidden_states(model, batch):
    """The last hidden states [B, T, H] of the decoder (the model minus its output layer)."""
    out = model.base_model(**T.model_inputs(model, batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def answer_loss(model, batch: Mapping) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch (as tasks.batch_loss), with the output layer applied
    only at the positions that predict an answer token."""
    h = _hidden_states(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:].to(h.device)
    sel = labels != T.IGNORE_INDEX
    if not bool(sel.any()):
        raise ValueError("the batch has no answer tokens to compute a loss on")
    logits = _output_layer(model)(h[sel]).float()
    return torch.nn.functional.cross_entropy(logits, labels[sel])


def choice_batch(tokenizer, examples: Sequence[T.Example], *, max_length: int | None = None) -> dict:
    """Every choice of every example as one padded batch (labels on the choice tokens), plus ``choice_index``
    [examples, most choices] (the sequence of each choice, -1 where an example has fewer) and ``choice_label``
    [examples] (the correct choice)."""
    seqs, index, labels = [], [], []
    for e in examples:
        if not e.is_choice:
            raise ValueError(f"choice_batch takes choice examples; task {e.task!r} has a completion example")
        index.append(list(range(len(seqs), len(seqs) + len(e.choices))))
        seqs.extend(T.encode(tokenizer, e.prompt, c, max_length=max_length) for c in e.choices)
        labels.append(e.label)
    b = T.collate(seqs, T._pad_id(tokenizer), padding_side="right")
    width = max(len(i) for i in index)
    b["choice_index"] = torch.tensor([i + [-1] * (width - len(i)) for i in index], dtype=torch.long)
    b["choice_label"] = torch.tensor(labels, dtype=torch.long)
    return b


def choice_loss(model, batch: Mapping) -> torch.Tensor:
    """MeZO's loss for classification tasks (its ``--train_as_classification``): cross-entropy over the choices,
    each choice scored by the mean log-probability of its tokens given the prompt (the score evaluation uses)."""
    sums, counts = _token_logprob_sums(model, batch)
    score = sums / counts.clamp(min=1)
    idx = batch["choice_index"].to(sums.device)
    scores = torch.where(idx >= 0, score[idx.clamp(min=0)], torch.full_like(idx, -math.inf, dtype=torch.float32))
    return torch.nn.functional.cross_entropy(scores, batch["choice_label"].to(sums.device))


LOSSES = {"choice": (choice_loss, choice_batch), "answer": (answer_loss, None)}


def _token_logprob_sums(model, batch):
    """Per sequence: the summed log-probability of its labelled tokens, and how many there are."""
    h = _hidden_states(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:].to(h.device)
    sel = labels != T.IGNORE_INDEX
    logp = torch.log_softmax(_output_layer(model)(h[sel]).float(), dim=-1)
    tok = logp.gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1)
    row = torch.nonzero(sel, as_tuple=True)[0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device).index_add(0, row, tok)
    return sums, sel.sum(-1)


@torch.no_grad()
def _sequence_logprobs(model, batch):
    return _token_logprob_sums(model, batch)


@torch.no_grad()
def evaluate(model, tokenizer, examples: Sequence[T.Example], *, batch_size: int = 64,
             reduction: str = "mean") -> dict:
    """accuracy (argmax of the choices' mean token log-probability; ``reduction="sum"`` for the sum), loss (gold
    answers' token cross-entropy), choice_ce (cross-entropy of the correct choice over the choices' scores: the
    classification training loss), n, and the predictions. Choice examples only; eval mode, mode restored."""
    seqs, spans = [], []
    for e in examples:
        if not e.is_choice:
            raise ValueError(f"finetune.evaluate takes choice examples; task {e.task!r} has a completion example")
        a = len(seqs)
        seqs.extend(T.encode(tokenizer, e.prompt, c) for c in e.choices)
        spans.append((a, len(seqs)))
    # sort by length so padded batches waste little; results are put back in order
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    sums = torch.empty(len(seqs))
    counts = torch.empty(len(seqs))
    pad = T._pad_id(tokenizer)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            b = T.collate([seqs[j] for j in idx], pad, padding_side="right")
            s, n = _sequence_logprobs(model, b)
            sums[idx] = s.float().cpu()
            counts[idx] = n.float().cpu()
    finally:
        model.train(was)
    correct, nll, ntok, ce, preds = 0, 0.0, 0, 0.0, []
    for e, (a, b) in zip(examples, spans):
        vals = sums[a:b] / counts[a:b] if reduction == "mean" else sums[a:b]
        p = int(vals.argmax())
        preds.append(p)
        correct += int(p == e.label)
        nll -= float(sums[a + e.label])
        ntok += int(counts[a + e.label])
        ce += float(torch.logsumexp(vals, 0) - vals[e.label])
    n = len(examples)
    return {"accuracy": correct / n if n else math.nan, "loss": nll / max(ntok, 1),
            "choice_ce": ce / n if n else math.nan, "n": n, "predictions": preds}


def evaluate_tasks(model, tokenizer, tasks: Mapping[str, Sequence[T.Example]], *, batch_size: int = 64,
                   keep_predictions: bool = False) -> dict:
    """{"tasks": {task: {accuracy, loss, n}}, "mean_accuracy": unweighted mean over tasks}."""
    per = {}
    for name, exs in tasks.items():
        r = evaluate(model, tokenizer, exs, batch_size=batch_size)
        if not keep_predictions:
            r.pop("predictions")
        per[name] = r
    mean = sum(v["accuracy"] for v in per.values()) / len(per) if per else math.nan
    return {"tasks": per, "mean_accuracy": mean}


# ---------------------------------------------------------------------------------------------------- MeZO's loop
class MezoNaive:
    """MeZO's in-place step with torch ops, as in its trainer: z regenerated per parameter from a seeded generator,
    ``p += eps z``, loss+, ``p -= 2 eps z``, loss-, ``p += eps z``, then ``p -= lr g z`` (each op rounds to the
    weight's dtype, nearest-even). In bf16 the three perturbations do not cancel exactly, so the weights drift."""

    def __init__(self, named_params, lr: float, eps: float = 1e-3, seed: int = 0):
        self.params = [p for _, p in named_params if p.requires_grad]
        self.lr, self.eps, self.seed, self.k = lr, eps, seed, 0
        self.device = self.params[0].device

    def _perturb(self, seed, scale):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure):
        seed = (self.seed * 1_000_003 + self.k) % (2 ** 62)
        self.k += 1
        self._perturb(seed, self.eps)
        lp = closure().detach().float()
        self._perturb(seed, -2 * self.eps)
        lm = closure().detach().float()
        self._perturb(seed, self.eps)
        g = float((lp - lm) / (2 * self.eps))      # MeZO reads g on the host
        if math.isfinite(g) and self.lr:
            self._perturb(seed, -self.lr * g)
        return (lp + lm) / 2


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    method: str = "mazo"
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    eps: float = 1e-3
    weight_decay: float = 0.0
    density: float = 0.1              # mazo
    sparsity: float = 0.75            # sparse-mezo
    mask_batches: int = 4             # mazo: batches per task scored
    mask_alpha: float = 1.0
    mask_beta: float = 0.0
    seed: int = 0
    mixing: str = "uniform"
    eval_every: int = 0               # 0: before and after only
    eval_batch_size: int = 64
    rounding: str | None = None       # ZOSGD: None = stochastic for bf16/fp16
    mode: str = "inplace"
    backend: str = "auto"
    loss_every: int = 10              # read the device-side loss back every this many steps
    deadline: float | None = None     # time.time() after which the run stops early (recorded as stopped_early)
    loss: str = "choice"              # "choice": CE over the choices' scores (MeZO's train_as_classification);
                                      # "answer": CE of the correct answer's tokens (LM-style teacher forcing)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(tokenizer, examples, loss: str = "choice") -> dict:
    """The training batch of ``loss``: all choices (choice_batch) or prompt + correct answer (tasks.training_batch)."""
    return choice_batch(tokenizer, examples) if loss == "choice" else T.training_batch(tokenizer, examples)


def build_method_masks(model, tokenizer, train_tasks, cfg: RunConfig):
    """(masks or None, seconds). Frozen (requires_grad=False): what the masks leave out (sparse-mezo, mazo)."""
    from .trainer import trainable_named_parameters
    t0 = time.perf_counter()
    masks = None
    if cfg.method == "sparse-mezo":
        from .sparse_mezo import sparse_mezo_masks
        masks = sparse_mezo_masks(model, cfg.sparsity)
    elif cfg.method == "mazo":
        from .mask_builder import build_mazo_masks
        loss_fn, _ = LOSSES[cfg.loss]
        batches = {name: [make_batch(tokenizer, list(exs)[i:i + cfg.batch_size], cfg.loss)
                          for i in range(0, min(len(exs), cfg.batch_size * cfg.mask_batches), cfg.batch_size)]
                   for name, exs in train_tasks.items()}
        dev = next(model.parameters()).device
        masks = build_mazo_masks(model, batches, cfg.density, alpha=cfg.mask_alpha, beta=cfg.mask_beta,
                                 loss_fn=lambda m, b: loss_fn(m, {k: v.to(dev) for k, v in b.items()}),
                                 device=dev)
    if masks is not None:
        for n, p in trainable_named_parameters(model):
            if n not in masks:
                p.requires_grad_(False)
    return masks, time.perf_counter() - t0


def run(model, tokenizer, train_tasks: Mapping, eval_sets: Mapping[str, Mapping], cfg: RunConfig, *,
        progress: bool = False, log: Callable | None = None, final_only: Sequence[str] = (), masks=None) -> dict:
    """Train ``model`` in place with ``cfg.method`` on batches mixed from ``train_tasks`` and evaluate on every
    set of ``eval_sets`` ({set name: {task: [Example]}}) before training, every ``cfg.eval_every`` steps and after
    the last step (sets named in ``final_only``: before and after only). ``masks``: use these (sparse-mezo, mazo)
    instead of building them.

    Returns {"config", "evals": [{"step", set name: evaluate_tasks result}], "loss": per-step training loss
    (ZO: the mean of the two perturbed losses), "train_time_s" (without evaluations), "mask_time_s",
    "forwards", "backwards", "trainable_params", "peak_mem_bytes" (CUDA: max allocated during training, else
    None), "stopped_early"}."""
    from .trainer import trainable_named_parameters
    dev = next(model.parameters()).device
    t_all = time.perf_counter()
    rec = {"config": asdict(cfg), "evals": [], "loss": [], "stopped_early": False}

    def do_eval(step, names=None):
        e = {"step": step}
        t0 = time.perf_counter()
        for name, sets in eval_sets.items():
            if names is None or name in names:
                e[name] = evaluate_tasks(model, tokenizer, sets, batch_size=cfg.eval_batch_size)
        e["time_s"] = time.perf_counter() - t0
        rec["evals"].append(e)
        if log:
            log(step, e)
        return e

    do_eval(0)
    if cfg.method == "zeroshot" or cfg.steps == 0:
        rec.update(train_time_s=0.0, mask_time_s=0.0, forwards=0, backwards=0, trainable_params=0,
                   peak_mem_bytes=None, total_time_s=time.perf_counter() - t_all)
        return rec

    for p in model.parameters():
        p.requires_grad_(True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    if masks is None or cfg.method not in ("sparse-mezo", "mazo"):
        masks, mask_time = build_method_masks(model, tokenizer, train_tasks, cfg)
    else:                                   # masks given (built earlier for the same method): freeze the rest
        mask_time = 0.0
        for n, p in trainable_named_parameters(model):
            if n not in masks:
                p.requires_grad_(False)
    named = trainable_named_parameters(model)
    n_train = (sum(masks.info[n].selected for n, _ in named if n in masks) if masks is not None
               else sum(p.numel() for _, p in named))
    fwd_per_step, bwd_per_step = (1, 1) if cfg.method == "adamw" else (2, 0)
    if cfg.method == "adamw":
        opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.method == "mezo-naive":
        opt = MezoNaive(named, cfg.lr, cfg.eps, seed=cfg.seed)
    else:
        from .optim import ZOSGD
        opt = ZOSGD(named, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, masks=masks, module=model,
                    seed=cfg.seed, rounding=cfg.rounding, mode=cfg.mode, backend=cfg.backend)
        rec["backend"] = opt.backend
    sampler = T.MultiTaskSampler(train_tasks, cfg.batch_size, mixing=cfg.mixing, seed=cfg.seed)
    losses = torch.zeros(cfg.steps, dtype=torch.float32, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc=cfg.method, unit="step", dynamic_ncols=True)
    train_time, done = 0.0, 0
    _sync(dev)
    t0 = time.perf_counter()
    model.eval()          # no dropout in this model family; ZO and AdamW see the same forward
    loss_fn = LOSSES[cfg.loss][0]
    for step in range(1, cfg.steps + 1):
        batch = make_batch(tokenizer, sampler.next_batch(), cfg.loss)
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        if cfg.method == "adamw":
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            losses[step - 1] = loss.detach()
        else:
            losses[step - 1] = opt.step(lambda: loss_fn(model, batch))
        done = step
        if bar is not None:
            bar.update(1)
            if step % cfg.loss_every == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{float(losses[max(0, step - cfg.loss_every):step].mean()):.3f}")
        late = cfg.deadline is not None and time.time() > cfg.deadline
        if (cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps) or late:
            _sync(dev)
            train_time += time.perf_counter() - t0
            if late:
                rec["stopped_early"] = True
                break
            do_eval(step, names=[n for n in eval_sets if n not in final_only])
            t0 = time.perf_counter()
    else:
        _sync(dev)
        train_time += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    peak = None
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev) - base_mem)
    rec["loss"] = [float(x) for x in losses[:done].cpu()]
    do_eval(done)
    for p in model.parameters():
        p.requires_grad_(True)
    rec.update(train_time_s=train_time, mask_time_s=mask_time, steps_done=done, forwards=fwd_per_step * done,
               backwards=bwd_per_step * done, trainable_params=int(n_train), peak_mem_bytes=peak,
               total_time_s=time.perf_counter() - t_all)
    if cfg.method == "adamw":
        opt.zero_grad(set_to_none=True)
    return rec


@contextlib.contextmanager
def restored(model):
    """Run a block and put the model's weights back (a host copy of the state dict)."""
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        with torch.no_grad():
            model.load_state_dict(sd)
        for p in model.parameters():
            p.requires_grad_(True)


def weight_drift(model, ref_state: Mapping) -> dict:
    """RMS(theta - theta0) / RMS(theta0) over all weights (float64 sums), and the fraction of elements changed."""
    num = den = 0.0
    changed = total = 0
    seen = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        w0 = ref_state[n].to(p.device)
        d = p.detach().double() - w0.double()
        num += float(d.pow(2).sum())
        den += float(w0.double().pow(2).sum())
        changed += int((p.detach() != w0).sum())
        total += p.numel()
    return {"rel_rms": math.sqrt(num / den) if den else math.nan, "changed_fraction": changed / total}


__all__ = ["METHODS", "ZO_METHODS", "DTYPES", "RunConfig", "answer_loss", "choice_loss", "choice_batch",
           "make_batch", "evaluate", "evaluate_tasks", "run",
           "MezoNaive", "restored", "weight_drift", "build_method_masks"]
