"""mazo-train: ZO fine-tuning (MeZO, Sparse MeZO, MaZO) of a causal LM on JSONL task files.

    mazo-train --model path/to/model --tasks sst2.jsonl rte.jsonl --method mazo --steps 2000 --output-dir out
    mazo-train --config tiny --tasks python_tests/data/task_*.jsonl --steps 50 --output-dir /tmp/run

Also ``python -m mazo_kernels.cli``. Nothing is downloaded: --model is a local directory (from_pretrained with
local_files_only), --config builds a random-init model ("tiny": a small LLaMA with a character tokenizer, or a
config JSON). The output directory receives model/ (save_pretrained, safetensors, with the tokenizer), masks.safetensors
(sparse-mezo / mazo), seed_log.json and metrics.json. docs/TRAINING.md describes the files.

Under torchrun (WORLD_SIZE > 1) the run is ZO data parallel (docs/DISTRIBUTED.md): every process builds the same
model and draws the same global batches, takes its contiguous share of each (--batch-size is the global batch and
must be divisible by the number of processes), and one all-gather of the losses per step keeps the replicas
bit-identical; CUDA processes use NCCL and GPU LOCAL_RANK, CPU processes gloo. Only rank 0 evaluates and writes.

    torchrun --nproc_per_node 2 -m mazo_kernels.cli --config tiny --tasks ... --batch-size 16 --output-dir out
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

class CLIError(ValueError):
    """A problem with the run's inputs (config, tokenizer, data) found after argument parsing."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------- arguments
def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _float_in(lo, hi, lo_open=False, hi_open=False, what=None):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = what or f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {rng}, got {s!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mazo-train", description="Zeroth-order fine-tuning (MeZO / Sparse MeZO / MaZO) on JSONL task files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model")
    g = src.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="DIR", help="local model directory (from_pretrained; nothing is downloaded)")
    g.add_argument("--config", metavar="tiny|JSON", help="random init: 'tiny' (small LLaMA + character tokenizer) "
                                                          "or a transformers config JSON")
    src.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --model's; with --config a "
                                                        "JSON, the character tokenizer)")
    src.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype")
    src.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    d = p.add_argument_group("data")
    d.add_argument("--tasks", nargs="+", required=True, metavar="JSONL", help="training task files")
    d.add_argument("--eval-tasks", nargs="+", metavar="JSONL",
                   help="evaluation task files (default: hold out --eval-examples per task from --tasks)")
    d.add_argument("--eval-examples", type=_nonneg_int, default=32,
                   help="examples per task to evaluate on: held out from --tasks (0: no evaluation), or with "
                        "--eval-tasks the first N of each task (0: all)")
    d.add_argument("--mixing", choices=["uniform", "proportional"], default="uniform",
                   help="how tasks are mixed in training batches")
    d.add_argument("--max-length", type=_positive_int, default=None, help="truncate prompt+answer to this many "
                                                                          "tokens (prompt cut from the left)")

    t = p.add_argument_group("training")
    t.add_argument("--method", choices=["mezo", "sparse-mezo", "mazo"], default="mezo")
    t.add_argument("--steps", type=_positive_int, default=100)
    t.add_argument("--batch-size", type=_positive_int, default=8)
    t.add_argument("--lr", type=_float_in(0, math.inf, what="[0, inf)"), default=1e-6)
    t.add_argument("--eps", type=_float_in(0, math.inf, lo_open=True, what="(0, inf)"), default=1e-3)
    t.add_argument("--weight-decay", type=_float_in(0, math.inf, what="[0, inf)"), default=0.0)
    t.add_argument("--density", type=_float_in(0, 1, lo_open=True), default=None,
                   help="mazo: fraction of each weight matrix trained (default 0.1)")
    t.add_argument("--sparsity", type=_float_in(0, 1, hi_open=True), default=None,
                   help="sparse-mezo: fraction of each weight matrix (largest |w|) frozen (default 0.75)")
    t.add_argument("--unmasked", choices=["train", "freeze"], default="freeze",
                   help="sparse-mezo/mazo: weights that get no mask (norms, biases, embeddings for mazo)")
    t.add_argument("--mask-batches", type=_positive_int, default=4, help="mazo: batches per task scored")
    t.add_argument("--mask-scorer", choices=["gradient", "activation"], default="gradient")
    t.add_argument("--dist", choices=["gaussian", "gaussian_fast", "rademacher"], default="gaussian")
    t.add_argument("--q", type=_positive_int, default=1, help="perturbation directions per step")
    t.add_argument("--estimator", choices=["two_sided", "one_sided"], default="two_sided")
    t.add_argument("--mode", choices=["inplace", "transient"], default="inplace")
    t.add_argument("--lookahead", action="store_true",
                   help="ZOSGD(lookahead=True): each update also applies the next step's +eps pass (two passes per "
                        "step, the same weights); settled before every evaluation and at the end")
    t.add_argument("--forward-mode", choices=["eval", "train"], default="eval")
    t.add_argument("--rounding", choices=["stochastic", "nearest"], default=None,
                   help="bf16/fp16 update rounding (default stochastic)")
    t.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda", "fastest"], default="auto")
    t.add_argument("--seed", type=_nonneg_int, default=0, help="seeds the ZO noise, the data order and random init")

    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=_nonneg_int, default=0,
                   help="evaluate every N steps (0: only before and after training)")
    e.add_argument("--eval-batch-size", type=_positive_int, default=32, help="sequences per scoring forward")
    e.add_argument("--score", choices=["mean", "sum"], default="mean",
                   help="choice score: mean or sum of the choice tokens' log-probabilities")
    e.add_argument("--output-dir", required=True, metavar="DIR")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--replica-check-every", type=_nonneg_int, default=100,
                   help="under torchrun: steps between checks that the replicas are bit-identical (0: never)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.density is not None and a.method != "mazo":
        p.error(f"argument --density: applies to --method mazo, not {a.method}")
    if a.sparsity is not None and a.method != "sparse-mezo":
        p.error(f"argument --sparsity: applies to --method sparse-mezo, not {a.method}")
    if a.tokenizer is not None and a.config == "tiny":
        p.error("argument --tokenizer: --config tiny uses its own character tokenizer")
    if a.model is not None and not os.path.isdir(a.model):
        p.error(f"argument --model: {a.model!r} is not a directory (a local model directory is required; nothing "
                "is downloaded)")
    if a.config not in (None, "tiny") and not os.path.isfile(a.config):
        p.error(f"argument --config: {a.config!r} is neither 'tiny' nor a config JSON file")
    for f in a.tasks + (a.eval_tasks or []):
        if not os.path.isfile(f):
            p.error(f"argument --tasks/--eval-tasks: {f!r} is not a file")
    if a.eval_every and a.eval_examples == 0 and not a.eval_tasks:
        p.error("argument --eval-every: nothing to evaluate with --eval-examples 0 and no --eval-tasks")
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(a.device)
    except RuntimeError:
        p.error(f"argument --device: {a.device!r} is not a torch device")
    return a


# ---------------------------------------------------------------------------------------------------- model
def load_model(a):
    """(model, tokenizer) on a.device in a.dtype; nothing is downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .tasks import prepare_tokenizer
    from .tiny import char_tokenizer, tiny_llama

    dtype = DTYPES[a.dtype]
    if a.config == "tiny":
        model, tok = tiny_llama(seed=a.seed, dtype=dtype)
    elif a.config is not None:
        tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True) if a.tokenizer else char_tokenizer()
        try:
            config = AutoConfig.from_pretrained(a.config, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise CLIError(f"--config {a.config}: not a transformers config JSON ({exc})") from exc
        if getattr(config, "vocab_size", None) is not None and config.vocab_size < len(tok):
            raise CLIError(f"--config {a.config}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                             f"{len(tok)} tokens")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(dtype)
    else:
        tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, local_files_only=True)
    return model.to(a.device), prepare_tokenizer(tok)


# ---------------------------------------------------------------------------------------------------- run
def _eval(model, tok, eval_tasks, a, step, train_loss):
    from .tasks import evaluate_tasks
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, eval_tasks, batch_size=a.eval_batch_size, reduction=a.score,
                         max_length=a.max_length)
    return {"step": step, "train_loss": train_loss, "mean_accuracy": res["mean_accuracy"], "tasks": res["tasks"],
            "eval_time_s": time.perf_counter() - t0}


def run(a: argparse.Namespace) -> dict:
    """Train as the parsed arguments say and write the output directory; returns the metrics written."""
    from tqdm.auto import tqdm

    from .mask_builder import save_masks
    from .tasks import MultiTaskSampler, batch_loss, load_tasks, split_tasks, training_batch
    from .trainer import ZOArguments, build_masks, make_zo_optimizer, task_batches_for_masks

    t_start = time.perf_counter()
    rank, world = _init_distributed(a)
    if a.batch_size % world:
        raise CLIError(f"--batch-size {a.batch_size} is the global batch; it must be divisible by the {world} "
                       "processes")
    zo = ZOArguments(method=a.method, eps=a.eps, sparsity=a.sparsity, density=a.density, dist=a.dist,
                     num_perturbations=a.q, estimator=a.estimator, rounding=a.rounding, mode=a.mode,
                     forward_mode=a.forward_mode, seed=a.seed, backend=a.backend, mask_batches=a.mask_batches,
                     mask_scorer=a.mask_scorer, unmasked=a.unmasked, score_reduction=a.score,
                     replica_check_every=a.replica_check_every, lookahead=a.lookahead)
    tasks = load_tasks(a.tasks)
    if a.eval_tasks:
        train_tasks, eval_tasks = tasks, load_tasks(a.eval_tasks)
        eval_tasks = {k: v[:a.eval_examples] if a.eval_examples else v for k, v in eval_tasks.items()}
    else:
        try:
            train_tasks, eval_tasks = split_tasks(tasks, a.eval_examples, seed=a.seed)
        except ValueError as exc:
            raise CLIError(f"--eval-examples {a.eval_examples}: {exc}") from None
    if rank == 0:
        os.makedirs(a.output_dir, exist_ok=True)

    model, tok = load_model(a)
    batches = None
    if a.method == "mazo":
        batches = task_batches_for_masks(train_tasks, tok, batch_size=a.batch_size, n_batches=a.mask_batches,
                                         max_length=a.max_length)
    t_masks = time.perf_counter()
    masks = build_masks(model, zo, task_batches=batches)
    if world > 1 and masks:
        from .distributed import sync_masks
        sync_masks(masks)                     # scores computed on GPUs can differ in the last bits between ranks
    t_masks = time.perf_counter() - t_masks
    opt = make_zo_optimizer(model, zo, lr=a.lr, weight_decay=a.weight_decay, masks=masks, seed=a.seed)
    if world > 1:
        from .distributed import data_parallel
        data_parallel(opt, check_every=a.replica_check_every)   # also checks now that every rank starts equal
    model.train(a.forward_mode == "train")   # ZOSGD itself switches to eval() around forwards in "eval" mode
    n_trainable = sum(e.tensor.numel() for e in opt.plan.entries)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    sampler = MultiTaskSampler(train_tasks, a.batch_size, mixing=a.mixing, seed=a.seed)
    evals = []
    if eval_tasks and rank == 0:
        evals.append(_eval(model, tok, eval_tasks, a, 0, None))
    share = a.batch_size // world
    losses = torch.zeros(a.steps, dtype=torch.float32, device=a.device)   # read back every 10 steps, not per step
    last_eval = 0
    bar = tqdm(total=a.steps, desc=f"{a.method}", unit="step", disable=a.no_progress or rank != 0,
               dynamic_ncols=True)
    t_train, t_eval_total = time.perf_counter(), 0.0
    for step in range(1, a.steps + 1):
        exs = sampler.next_batch()                            # the global batch: the same on every rank
        batch = training_batch(tok, exs[rank * share:(rank + 1) * share], max_length=a.max_length)
        batch = {k: v.to(a.device) for k, v in batch.items()}
        losses[step - 1] = opt.step(lambda: batch_loss(model, batch))
        bar.update(1)
        if step % 10 == 0 or step == a.steps:
            bar.set_postfix(loss=f"{float(losses[max(0, step - 10):step].mean()):.4f}")
        evaluates = eval_tasks and (step == a.steps or (a.eval_every and step % a.eval_every == 0))
        if evaluates:
            opt.settle()        # lookahead: every rank, so the replicas (and their seed logs) stay equal
        if evaluates and rank == 0:
            te = time.perf_counter()
            evals.append(_eval(model, tok, eval_tasks, a, step, float(losses[last_eval:step].mean())))
            last_eval = step
            t_eval_total += time.perf_counter() - te
            bar.write(f"step {step}: mean accuracy {evals[-1]['mean_accuracy']:.4f} " + " ".join(
                f"{k}={v['accuracy']:.3f}" for k, v in evals[-1]["tasks"].items()))
    bar.close()
    opt.settle()                  # lookahead: the saved model and the seed log's replay are the settled weights
    train_time = time.perf_counter() - t_train - t_eval_total

    if rank != 0:                 # only rank 0 writes; the replicas are bit-identical
        _finish_distributed()
        return {"rank": rank, "world_size": world, "steps": a.steps, "evals": evals}
    model_dir = os.path.join(a.output_dir, "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    files = {"model": "model"}
    if masks:
        save_masks(os.path.join(a.output_dir, "masks.safetensors"), masks)
        files["masks"] = "masks.safetensors"
    opt.seed_log.to_json(os.path.join(a.output_dir, "seed_log.json"))
    files["seed_log"] = "seed_log.json"
    train_losses = losses.cpu().tolist()
    metrics = {
        "evals": evals,
        "train_loss": train_losses,
        "steps": a.steps,
        "train_time_s": train_time,
        "steps_per_s": a.steps / train_time if train_time > 0 else None,
        "mask_time_s": t_masks,
        "total_time_s": time.perf_counter() - t_start,
        "trainable_params": n_trainable,
        "total_params": n_params,
        "backend": opt.backend,
        "device": str(a.device),
        "world_size": world,
        "tasks": {k: len(v) for k, v in train_tasks.items()},
        "eval_tasks": {k: len(v) for k, v in eval_tasks.items()},
        "zo_args": zo.to_dict(),
        "args": {k: v for k, v in vars(a).items()},
        "files": {**files, "metrics": "metrics.json"},
    }
    with open(os.path.join(a.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    _finish_distributed()
    return metrics


def _init_distributed(a):
    """(rank, world size); under torchrun initialises the process group and picks this process's GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    from .distributed import init_from_env
    dev = torch.device(a.device)
    owned = not dist.is_initialized()
    rank, world, local_rank = init_from_env("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        a.device = f"cuda:{local_rank}"
    _DIST_STATE["owned"] = owned
    return rank, world


_DIST_STATE = {"owned": False}


def _finish_distributed():
    if _DIST_STATE["owned"]:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
        _DIST_STATE["owned"] = False


def main(argv=None) -> int:
    a = parse_args(argv)
    from .tasks import TaskFormatError
    try:
        m = run(a)
    except (TaskFormatError, CLIError) as exc:      # bad task files or configs: one clear line, not a traceback
        print(f"mazo-train: error: {exc}", file=sys.stderr)
        return 2
    if m.get("rank", 0) != 0:
        return 0
    last = m["evals"][-1] if m["evals"] else None
    summary = f"{m['steps']} steps in {m['train_time_s']:.1f} s ({m['steps_per_s']:.2f} steps/s)"
    if last is not None:
        summary += f"; mean accuracy {m['evals'][0]['mean_accuracy']:.4f} -> {last['mean_accuracy']:.4f}"
    print(f"{summary}; wrote {a.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
