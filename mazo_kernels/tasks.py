"""Tasks for ZO fine-tuning: JSONL task files, a multi-task sampler, the answer-only loss and choice scoring.

A task file holds one JSON object per line, either

    {"prompt": "...", "choices": ["...", "..."], "label": 1}     classification / multiple choice
    {"prompt": "...", "completion": "..."}                       generation

with an optional "task" name (default: the file's stem). The answer (the correct choice, or the completion) is
tokenized on its own, without special tokens, and appended to the tokenized prompt; the loss is the cross-entropy of
the answer tokens only. Choice tasks are evaluated by the mean log-probability of each choice's tokens given the
prompt (``reduction="sum"`` for the plain sum); the highest-scoring choice is the prediction. Completion tasks are
evaluated by teacher-forced exact match: every answer token is the model's argmax given the prompt and the gold
tokens before it, which is exactly "greedy decoding reproduces the completion".

Works with any Hugging Face causal LM and tokenizer: the functions take a model that maps ``input_ids`` and
``attention_mask`` (and ``position_ids`` where its forward accepts them) to an output with ``.logits``.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

IGNORE_INDEX = -100
MIXINGS = ("uniform", "proportional")
REDUCTIONS = ("mean", "sum")


class TaskFormatError(ValueError):
    """A task file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    """One example. Choice examples have ``choices`` and ``label``; completion examples have ``completion``."""
    prompt: str
    task: str
    choices: tuple | None = None
    label: int | None = None
    completion: str | None = None

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    @property
    def target(self) -> str:
        """The text the loss trains on: the correct choice, or the completion."""
        return self.choices[self.label] if self.is_choice else self.completion


# --------------------------------------------------------------------------------------------------------------------
# Task files

def _parse_line(obj, where: str, default_task: str) -> Example:
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise TaskFormatError(f"{where}: missing field 'prompt'")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise TaskFormatError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task:
        raise TaskFormatError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    has_choices, has_completion = "choices" in obj, "completion" in obj
    if has_choices and has_completion:
        raise TaskFormatError(f"{where}: has both 'choices' and 'completion'; an example is one or the other")
    if has_completion:
        if "label" in obj:
            raise TaskFormatError(f"{where}: 'label' belongs to choice examples, not to a 'completion' example")
        c = obj["completion"]
        if not isinstance(c, str) or not c:
            raise TaskFormatError(f"{where}: 'completion' must be a non-empty string, got {c!r}")
        return Example(prompt=prompt, task=task, completion=c)
    if not has_choices:
        raise TaskFormatError(f"{where}: missing field 'choices' (with 'label') or 'completion'")
    choices = obj["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise TaskFormatError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    if "label" not in obj:
        raise TaskFormatError(f"{where}: missing field 'label' (the index of the correct choice)")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise TaskFormatError(f"{where}: 'label' must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        raise TaskFormatError(f"{where}: label {label} out of range for {len(choices)} choices")
    return Example(prompt=prompt, task=task, choices=tuple(choices), label=label)


def load_task_file(path, task: str | None = None) -> list[Example]:
    """Read one JSONL task file. ``task`` is the default task name (the file's stem if None).

    Blank lines are skipped. Any problem raises TaskFormatError naming the file and the 1-based line."""
    path = os.fspath(path)
    default_task = task or os.path.splitext(os.path.basename(path))[0]
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise TaskFormatError(f"{path}: cannot read task file ({exc.strerror or exc})") from exc
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            out.append(_parse_line(obj, where, default_task))
    if not out:
        raise TaskFormatError(f"{path}:1: empty task file (no examples)")
    return out


def load_tasks(paths: Iterable) -> dict[str, list[Example]]:
    """Read task files into {task name: examples}, tasks in order of first appearance."""
    tasks: dict[str, list[Example]] = {}
    for p in paths:
        for ex in load_task_file(p):
            tasks.setdefault(ex.task, []).append(ex)
    if not tasks:
        raise TaskFormatError("no task files given")
    return tasks


def split_tasks(tasks: Mapping[str, Sequence[Example]], eval_examples: int, *, seed: int = 0):
    """Hold out up to ``eval_examples`` examples per task (a seeded shuffle; at most half of each task).

    Returns (train, eval) dicts. With eval_examples == 0 the eval dict is empty."""
    if eval_examples < 0:
        raise ValueError(f"eval_examples must be >= 0, got {eval_examples}")
    train, held = {}, {}
    for i, (name, exs) in enumerate(tasks.items()):
        order = list(range(len(exs)))
        random.Random(f"{seed}:{name}").shuffle(order)
        k = min(eval_examples, len(exs) // 2)
        if eval_examples and k == 0:
            raise ValueError(f"task {name!r} has {len(exs)} example(s): too few to hold out evaluation examples; "
                             "give it more examples or separate evaluation files")
        held_idx = set(order[:k])
        train[name] = [e for j, e in enumerate(exs) if j not in held_idx]
        if k:
            held[name] = [e for j, e in enumerate(exs) if j in held_idx]
    return train, held


# --------------------------------------------------------------------------------------------------------------------
# Multi-task sampling

class MultiTaskSampler:
    """Seeded, deterministic batches drawn from several tasks.

    Every slot of a batch first picks a task (``uniform``: each task equally likely; ``proportional``: in proportion
    to its number of examples), then takes that task's next example; each task walks through its own shuffled
    order and reshuffles when it runs out, so every example is seen once per pass over its task. The same seed gives
    the same batches on every machine (Python's ``random.Random``)."""

    def __init__(self, tasks: Mapping[str, Sequence], batch_size: int, *, mixing: str = "uniform", seed: int = 0):
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {list(MIXINGS)}, got {mixing!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not tasks:
            raise ValueError("MultiTaskSampler needs at least one task")
        for name, exs in tasks.items():
            if len(exs) == 0:
                raise ValueError(f"task {name!r} has no examples")
        self.tasks = {k: list(v) for k, v in tasks.items()}
        self.names = list(self.tasks)
        self.batch_size = batch_size
        self.mixing = mixing
        sizes = [len(self.tasks[n]) for n in self.names]
        total = sum(sizes)
        self.weights = [1.0 / len(sizes)] * len(sizes) if mixing == "uniform" else [s / total for s in sizes]
        self._rng = random.Random(seed)
        self._order = {n: [] for n in self.names}

    def _next_of(self, name):
        if not self._order[name]:
            order = list(range(len(self.tasks[name])))
            self._rng.shuffle(order)
            self._order[name] = order[::-1]        # pop() from the end walks the shuffle front to back
        return self.tasks[name][self._order[name].pop()]

    def next_batch(self) -> list:
        picks = self._rng.choices(self.names, weights=self.weights, k=self.batch_size)
        return [self._next_of(n) for n in picks]

    def __iter__(self) -> Iterator[list]:
        while True:
            yield self.next_batch()


# --------------------------------------------------------------------------------------------------------------------
# Tokenization and batches

def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token (its eos token) if it has none; padding is masked, so its id is irrelevant."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set "
                             "tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer, prompt: str, answer: str, *, max_length: int | None = None, add_eos: bool = False):
    """Token ids of prompt + answer and the number of answer tokens at the end.

    The prompt gets the tokenizer's special tokens (e.g. BOS), the answer none (plus EOS with ``add_eos``). Too long
    a sequence loses prompt tokens from the left, so the answer and the prompt's end survive."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        a.append(tokenizer.eos_token_id)
    if not a:
        raise ValueError(f"answer {answer!r} tokenizes to no tokens")
    if max_length is not None:
        if len(a) >= max_length:
            raise ValueError(f"answer of {len(a)} tokens does not fit in max_length={max_length} with its prompt")
        p = p[-(max_length - len(a)):]
    if not p:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens; an answer needs at least one token before it")
    return p + a, len(a)


def collate(seqs: Sequence, pad_id: int, *, padding_side: str = "right") -> dict:
    """Pad (ids, n_answer) pairs into a batch: input_ids, attention_mask, position_ids, and labels that are the
    input ids on the answer tokens and IGNORE_INDEX elsewhere (prompt and padding).

    position_ids count real tokens only, so left padding gives the same positions as no padding."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_ans) in enumerate(seqs):
        L = len(ids)
        s = T - L if padding_side == "left" else 0
        input_ids[i, s:s + L] = torch.tensor(ids, dtype=torch.long)
        attn[i, s:s + L] = 1
        labels[i, s + L - n_ans:s + L] = input_ids[i, s + L - n_ans:s + L]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids, "labels": labels}


def _padding_side(tokenizer, padding_side):
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    return side


def _pad_id(tokenizer):
    prepare_tokenizer(tokenizer)
    return tokenizer.pad_token_id


def training_batch(tokenizer, examples: Sequence[Example], *, max_length: int | None = None,
                   padding_side: str | None = None, completion_eos: bool = True) -> dict:
    """The batch the training loss runs on: each example's prompt + target, labels on the target tokens.

    Completion examples get EOS appended (``completion_eos``) so the model learns where to stop; choices do not,
    so training and choice scoring see the same tokens."""
    seqs = [encode(tokenizer, e.prompt, e.target, max_length=max_length,
                   add_eos=completion_eos and not e.is_choice) for e in examples]
    return collate(seqs, _pad_id(tokenizer), padding_side=_padding_side(tokenizer, padding_side))


class TaskCollator:
    """A data collator (for torch DataLoader / transformers Trainer) turning Examples into training batches."""

    def __init__(self, tokenizer, *, max_length: int | None = None, padding_side: str | None = None,
                 completion_eos: bool = True):
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.max_length = max_length
        self.padding_side = padding_side
        self.completion_eos = completion_eos

    def __call__(self, examples):
        return training_batch(self.tokenizer, examples, max_length=self.max_length,
                              padding_side=self.padding_side, completion_eos=self.completion_eos)


class TaskDataset(torch.utils.data.Dataset):
    """A map-style dataset of Examples (random sampling over it mixes tasks in proportion to their size)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class MixedTaskDataset(torch.utils.data.IterableDataset):
    """An endless stream of Examples from MultiTaskSampler (uniform or proportional mixing, seeded).

    Use it with a batch size equal to ``batch_size`` (or 1 and any batch size: examples come one at a time)."""

    def __init__(self, tasks: Mapping[str, Sequence[Example]], *, mixing: str = "uniform", seed: int = 0):
        self.tasks, self.mixing, self.seed = tasks, mixing, seed
        MultiTaskSampler(tasks, 1, mixing=mixing, seed=seed)  # validate now, not in a worker

    def __iter__(self):
        s = MultiTaskSampler(self.tasks, 1, mixing=self.mixing, seed=self.seed)
        while True:
            yield s.next_batch()[0]


# --------------------------------------------------------------------------------------------------------------------
# Forward, loss and scoring

def _accepts(model, name: str) -> bool:
    """Whether the forward takes keyword ``name``: named in its signature, or (behind **kwargs) in the signature of
    the model a wrapper such as a PEFT model forwards to."""
    m = model
    for _ in range(4):
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            return True
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
        inner = getattr(m, "get_base_model", None)
        if inner is None:
            return True
        m = inner()
    return True


def model_inputs(model, batch: Mapping) -> dict:
    """The model's inputs from a batch: input_ids, attention_mask, and position_ids where the forward takes them."""
    device = next(model.parameters()).device
    out = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if "position_ids" in batch and _accepts(model, "position_ids"):
        out["position_ids"] = batch["position_ids"].to(device)
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of the batch; position t predicts token t + 1."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    n = (shift_labels != IGNORE_INDEX).sum()
    if int(n) == 0:
        raise ValueError("the batch has no answer tokens to compute a loss on")
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / n


def batch_loss(model, batch: Mapping) -> torch.Tensor:
    """Forward the batch and return the answer-token loss (a 0-d float32 tensor). No graph is needed for ZO: call
    it under torch.no_grad()."""
    logits = model(**model_inputs(model, batch)).logits
    return lm_loss(logits, batch["labels"])


def sequence_scores(model, batch: Mapping):
    """Per sequence: the summed log-probability of its answer tokens, their number, and whether every answer token
    is the argmax (teacher-forced exact match)."""
    logits = model(**model_inputs(model, batch)).logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    sel = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp_sum = (logp * sel).sum(-1)
    hit = (logits.argmax(-1) == labels) | ~sel
    return logp_sum, sel.sum(-1), hit.all(-1)


@torch.no_grad()
def _score_sequences(model, tokenizer, seqs, batch_size, padding_side):
    """Scores in eval mode (no dropout); the model's previous mode is restored."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    pad = _pad_id(tokenizer)
    side = _padding_side(tokenizer, padding_side)
    sums, counts, hits = [], [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(seqs), batch_size):
            s, n, h = sequence_scores(model, collate(seqs[i:i + batch_size], pad, padding_side=side))
            sums.append(s.cpu())
            counts.append(n.cpu())
            hits.append(h.cpu())
    finally:
        model.train(was_training)
    return torch.cat(sums), torch.cat(counts), torch.cat(hits)


def score_choices(model, tokenizer, examples: Sequence[Example], *, reduction: str = "mean", batch_size: int = 32,
                  max_length: int | None = None, padding_side: str | None = None) -> list[torch.Tensor]:
    """Log-probability score of every choice of every (choice) example: one float32 tensor of len(choices) each.

    ``reduction="mean"`` divides each choice's summed token log-probability by its number of tokens (so longer
    choices are not penalised for their length); ``"sum"`` keeps the sum. All choices of all examples are flattened
    into sequences and scored ``batch_size`` sequences per padded forward, in eval mode."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    seqs, owner = [], []
    for k, e in enumerate(examples):
        if not e.is_choice:
            raise ValueError(f"score_choices: example {k} of task {e.task!r} is a completion example")
        for c in e.choices:
            seqs.append(encode(tokenizer, e.prompt, c, max_length=max_length))
            owner.append(k)
    sums, counts, _ = _score_sequences(model, tokenizer, seqs, batch_size, padding_side)
    vals = sums / counts if reduction == "mean" else sums
    out, j = [], 0
    for e in examples:
        out.append(vals[j:j + len(e.choices)].clone())
        j += len(e.choices)
    return out


def evaluate(model, tokenizer, examples: Sequence[Example], *, reduction: str = "mean", batch_size: int = 32,
             max_length: int | None = None, padding_side: str | None = None, completion_eos: bool = True) -> dict:
    """Accuracy and loss on a list of examples (any mix of choice and completion examples).

    accuracy: choice examples are right when the correct choice has the highest score (``reduction``); completion
    examples when teacher-forced greedy prediction reproduces every completion token. loss: the cross-entropy of
    the gold answers' tokens (the correct choice, or the completion), averaged over tokens as in training.
    Scoring runs in eval mode (no dropout); the model's mode is restored afterwards."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not examples:
        raise ValueError("evaluate needs at least one example")
    seqs, spans = [], []
    for e in examples:
        start = len(seqs)
        if e.is_choice:
            seqs.extend(encode(tokenizer, e.prompt, c, max_length=max_length) for c in e.choices)
        else:
            seqs.append(encode(tokenizer, e.prompt, e.completion, max_length=max_length, add_eos=completion_eos))
        spans.append((start, len(seqs)))
    sums, counts, hits = _score_sequences(model, tokenizer, seqs, batch_size, padding_side)
    correct, nll, ntok = 0, 0.0, 0
    for e, (a, b) in zip(examples, spans):
        if e.is_choice:
            vals = sums[a:b] / counts[a:b] if reduction == "mean" else sums[a:b]
            correct += int(int(vals.argmax()) == e.label)
            g = a + e.label
        else:
            correct += int(hits[a])
            g = a
        nll -= float(sums[g])
        ntok += int(counts[g])
    return {"accuracy": correct / len(examples), "loss": nll / ntok, "n": len(examples)}


def evaluate_tasks(model, tokenizer, tasks: Mapping[str, Sequence[Example]], **kwargs) -> dict:
    """{task: evaluate(...)} plus "mean_accuracy" (unweighted over tasks)."""
    per = {name: evaluate(model, tokenizer, exs, **kwargs) for name, exs in tasks.items()}
    mean = sum(v["accuracy"] for v in per.values()) / len(per) if per else math.nan
    return {"tasks": per, "mean_accuracy": mean}
