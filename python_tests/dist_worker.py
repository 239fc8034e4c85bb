"""One rank of the CPU (gloo) data-parallel / FSDP2 runs of test_distributed.py; also usable under torchrun.

    python python_tests/dist_worker.py OUT_DIR SCENARIO [SCENARIO ...]      (RANK, WORLD_SIZE, MASTER_* set)

Scenarios: dp (fp32 two-sided and bf16 q=2 runs), tamper (a replica modified by one ulp must be caught), fail
(one rank's closure raises: the others skip the step instead of hanging, replicas stay identical), fsdp (FSDP2
fully_shard: the noise seen by the forward and the weights after a few steps). Rank 0 writes OUT_DIR/<name>.pt;
every rank writes its own final weights where the test compares replicas.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mazo_kernels as mk                                           # noqa: E402
from mazo_kernels import distributed as mkd                          # noqa: E402

STEPS = 4
GLOBAL_BATCH = 8
BACKEND = "cpu" if mk.has_cpu() else "reference"


class Net(nn.Module):
    """fc1 has 10 rows (4 ranks: shards of 3, 3, 3, 1 rows), fc2 has 3 (4 ranks: 1, 1, 1 and an empty shard)."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        self.to(dtype)

    def forward(self, x, y):
        out = self.fc2(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))))
        return ((out.float() - y) ** 2).mean()


def global_batch(step, n=GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 12, generator=g), torch.randn(n, 3, generator=g)


CONFIGS = {   # name: (dtype, ZOSGD options)
    "fp32": (torch.float32, dict(lr=2e-2, eps=1e-3, weight_decay=0.01, seed=11)),
    "bf16q2": (torch.bfloat16, dict(lr=5e-2, eps=1e-2, num_perturbations=2, seed=12)),
    "fp32_one_sided_rad": (torch.float32, dict(lr=1e-2, eps=1e-3, estimator="one_sided", dist="rademacher",
                                               seed=13)),
}


def make_opt(model, cfg, **extra):
    _, kw = CONFIGS[cfg]
    return mk.ZOSGD(model.named_parameters(), module=model, backend=BACKEND, **kw, **extra)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def scenario_dp(out, rank, world):
    for cfg in ("fp32", "bf16q2", "fp32_one_sided_rad"):
        model = Net(0, CONFIGS[cfg][0])
        opt = make_opt(model, cfg)
        hook = mkd.data_parallel(opt, check_every=2)
        losses = []
        for k in range(STEPS):
            x, y = mkd.shard_batch(global_batch(k))
            losses.append(float(opt.step(lambda: model(x, y))))
        mkd.check_replicas(model)
        torch.save({"weights": _state(model), "losses": losses, "checked": hook.last_checked_step},
                   os.path.join(out, f"dp_{cfg}_w{world}_r{rank}.pt"))
        if rank == 0:
            torch.save(opt.state_dict()["seed_log"], os.path.join(out, f"dp_{cfg}_w{world}_log.pt"))


def scenario_tamper(out, rank, world):
    model = Net(0)
    opt = make_opt(model, "fp32")
    mkd.data_parallel(opt, check_every=1)
    x, y = mkd.shard_batch(global_batch(0))
    opt.step(lambda: model(x, y))
    if rank == world - 1:
        with torch.no_grad():
            w = model.fc1.weight.view(-1)
            w[5] = torch.nextafter(w[5], torch.tensor(float("inf")))
    before = _state(model)
    err = None
    try:
        opt.step(lambda: model(x, y))
    except mkd.ReplicaDivergence as exc:
        err = str(exc)
    after = _state(model)
    rec = opt.seed_log.steps[-1]
    torch.save({"error": err, "skipped": rec["skipped"], "log_error": rec["error"],
                "unchanged": all(torch.equal(before[n], after[n]) for n in before)},
               os.path.join(out, f"tamper_w{world}_r{rank}.pt"))


def scenario_fail(out, rank, world):
    """Rank 1's closure raises at step 1: it re-raises, every other rank skips that step (NaN losses); all continue
    and the replicas stay bit-identical."""
    model = Net(0)
    opt = make_opt(model, "fp32")
    mkd.data_parallel(opt, check_every=1)
    raised = None
    for k in range(3):
        x, y = mkd.shard_batch(global_batch(k))

        def closure():
            if k == 1 and rank == 1:
                raise RuntimeError("injected failure")
            return model(x, y)

        try:
            opt.step(closure)
        except RuntimeError as exc:
            raised = str(exc)
    mkd.check_replicas(model)
    torch.save({"weights": _state(model), "raised": raised, "skipped": [s["skipped"] for s in opt.seed_log.steps]},
               os.path.join(out, f"fail_w{world}_r{rank}.pt"))


def scenario_fsdp(out, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = Net(0)
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model, "fp32")
    mkd.data_parallel(opt, check_every=2)
    shards = {e.name: (e.global_offset, e.tensor.numel(), e.full_numel) for e in opt.plan.entries}
    seen = {}
    for k in range(STEPS):
        x, y = mkd.shard_batch(global_batch(k))
        calls = []

        def closure():
            if k == 0 and not calls:      # the first forward of the run: the weights are theta0 + eps*z
                seen.update(mkd.full_state(model))
            calls.append(1)
            return model(x, y)

        opt.step(closure)
    final = mkd.full_state(model)
    errors = {}
    with torch.no_grad():
        model(*mkd.shard_batch(global_batch(0)))        # FSDP2 leaves the root unsharded after a forward
    for what, params, module in (("unsharded_list", list(model.named_parameters()), model),
                                 ("no_module", None, None)):
        try:
            mk.ZOSGD(params if params is not None else model.named_parameters(), module=module, backend=BACKEND)
        except ValueError as exc:
            errors[what] = str(exc)
    all_shards = [None] * world
    dist.all_gather_object(all_shards, shards)
    if rank == 0:
        torch.save({"perturbed": seen, "weights": final, "log": opt.state_dict()["seed_log"], "shards": all_shards,
                    "errors": errors},
                   os.path.join(out, f"fsdp_w{world}.pt"))


def scenario_trainer(out, rank, world):
    """ZOTrainer under a distributed launch: data parallel without a DDP wrapper; replicas bit-identical."""
    import transformers

    from mazo_kernels import tasks as T
    from mazo_kernels.tiny import tiny_llama
    from mazo_kernels.trainer import ZOArguments, ZOTrainer

    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    tasks = T.load_tasks([os.path.join(data, "task_sentiment.jsonl"), os.path.join(data, "task_echo.jsonl")])
    model, tok = tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"trainer_r{rank}"), max_steps=3, per_device_train_batch_size=2,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = ZOTrainer(model=model, args=args, zo_args=ZOArguments(eps=1e-3, backend=BACKEND, replica_check_every=1),
                        train_dataset=T.TaskDataset([e for exs in tasks.values() for e in exs]),
                        data_collator=T.TaskCollator(tok), processing_class=tok)
    trainer.train()
    wrapped = [type(m).__name__ for m in (trainer.model_wrapped, trainer.model)]
    ddp = any(isinstance(m, torch.nn.parallel.DistributedDataParallel)
              for m in (trainer.model_wrapped, trainer.model, *trainer.model.modules()))
    opt = trainer.zo_optimizer
    mkd.check_replicas(trainer.model)
    torch.save({"weights": _state(trainer.model), "wrapped": wrapped, "ddp": ddp,
                "same_object": trainer.model_wrapped is trainer.model, "world": trainer.args.world_size,
                "reduce": type(opt.loss_reduce).__name__,
                "checked": getattr(opt.loss_reduce, "last_checked_step", None),
                "log": opt.state_dict()["seed_log"]},
               os.path.join(out, f"trainer_w{world}_r{rank}.pt"))


def main():
    out, scenarios = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    done = False
    try:
        for s in scenarios:
            globals()[f"scenario_{s}"](out, rank, world)
            dist.barrier()
        done = True
    finally:
        if not done:
            dist.destroy_process_group()
    # Every rank has passed the last barrier, so every result file is written and no collective is pending. Leave
    # without the process group's and the interpreter's teardown: in CI a rank now and then aborted there ("terminate
    # called without an active exception", exit -6) after all its work was done, failing the launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
