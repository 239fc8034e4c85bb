"""Scale-out on torch.distributed: ZO data parallelism, sharded (FSDP2) weights, replica checks (docs/DISTRIBUTED.md).

Data parallel. Every rank holds the whole model and draws the same seeds (same base seed, same step counter), runs
the step's forwards on its own micro-batch, and the ranks exchange only their losses: one all-gather of the step's
2q (two-sided) or q + 1 (one-sided) float32 losses, combined on every rank in rank order by `combine_losses`. No
weight or gradient crosses the network, every rank computes the same g from the same bits, and the replicas stay
bit-identical. A single process that evaluates the same micro-batches and combines their losses with
`combine_losses` in the same order computes the same g, hence bit-identical weights.

    dist.init_process_group("nccl")                     # torchrun sets the rank / world size
    opt = mk.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3, module=model, seed=0)   # same seed on every rank
    mkd.data_parallel(opt, check_every=100)             # installs opt.loss_reduce
    for batch in loader:                                # each rank: its own shard of the global batch
        opt.step(lambda: model(**batch).loss)

Why an all-gather and not an all-reduce: a float32 sum depends on its order, and an all-reduce does not promise
rank order for more than two ranks (NCCL's ring and tree orders differ); gathering 4·2q bytes per rank and adding
them in rank order on every rank costs the same single collective and makes the result a pure function of the
per-rank losses.

Sharded weights. With FSDP2 (`torch.distributed.fsdp.fully_shard`) every trainable parameter is a DTensor whose
local shard is a contiguous block of rows. ZOSGD builds its plan from the local shards (`local_shard`), each with
the flat offset of the shard in the full tensor, so every element gets the noise of its global index: the same
noise, and the same update, whatever the number of ranks or the shard boundaries. The optimizer reshards the FSDP
modules before and after each forward, so each forward all-gathers the shards as the passes left them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

REDUCTIONS = ("mean", "sum")


class ReplicaDivergence(RuntimeError):
    """Data-parallel replicas that must be bit-identical are not."""


# ---------------------------------------------------------------------------------------------------- losses
def combine_losses(per_rank: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """[W, k] per-rank (or per-micro-batch) losses -> [k]: added in row order, ((l0 + l1) + l2) + ..., in float32,
    then for "mean" divided by W (a correctly rounded division). This is the whole definition of the data-parallel
    loss: a single process that evaluates W micro-batches and combines them with this function gets the same bits."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if per_rank.dim() != 2 or per_rank.shape[0] < 1:
        raise ValueError(f"combine_losses takes a [ranks, losses] tensor, got shape {tuple(per_rank.shape)}")
    per_rank = per_rank.to(torch.float32)
    acc = per_rank[0].clone()
    for r in range(1, per_rank.shape[0]):
        acc = acc + per_rank[r]
    if reduce == "mean" and per_rank.shape[0] > 1:
        acc = acc / torch.full_like(acc, float(per_rank.shape[0]))    # a tensor divisor: a true division everywhere
    return acc


def micro_batch_closure(loss_fn, micro_batches, reduce: str = "mean"):
    """The single-process equivalent of a data-parallel step: a closure that evaluates loss_fn on each micro-batch
    in order and combines the losses exactly as the ranks do (combine_losses)."""
    micro_batches = list(micro_batches)

    def closure():
        ls = [torch.as_tensor(loss_fn(mb)).detach().reshape(()).to(torch.float32) for mb in micro_batches]
        return combine_losses(torch.stack(ls).reshape(len(ls), 1), reduce)[0]

    return closure


def shard_batch(batch, rank: int | None = None, world_size: int | None = None, group=None):
    """This rank's micro-batch: every tensor in `batch` (a tensor, dict, list or tuple of them) split along dim 0
    into world_size equal contiguous parts, part `rank`. The global batch size must be divisible by world_size."""
    if rank is None or world_size is None:
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size

    def cut(x):
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                return x
            n = x.shape[0]
            if n % world_size:
                raise ValueError(f"shard_batch: a batch of {n} rows does not split into {world_size} equal "
                                 "micro-batches; make the global batch a multiple of the world size")
            m = n // world_size
            return x[rank * m:(rank + 1) * m]
        if isinstance(x, Mapping):          # dicts, transformers' BatchEncoding (a UserDict): a plain dict back
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


# ---------------------------------------------------------------------------------------------------- checksums
_CHUNK = 1 << 22
_MULT = -7046029254386353131      # 0x9E3779B97F4A7C15 as int64 bits


def replica_checksum(tensors) -> torch.Tensor:
    """A cheap bitwise checksum of a list of tensors (or a module's parameters): 0-d int64 on the first tensor's
    device. Each element's bit pattern is hashed (x·0x9E3779B97F4A7C15, xor-shift; int64 arithmetic wraps), the
    hashes are summed per tensor (integer sums: the result does not depend on the reduction order, so any device
    computes the same value) and the per-tensor sums weighted by (2i + 1). Any change of one element changes it;
    it reads the weights once (in chunks of 4 Mi elements, so the extra memory is 32 MiB at most)."""
    if isinstance(tensors, torch.nn.Module):
        seen, ts = set(), []
        for p in tensors.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                ts.append(p)
        tensors = ts
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    home = tensors[0].device
    total = torch.zeros((), dtype=torch.int64, device=home)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        flat = flat.view(ints[flat.element_size()]) if flat.dtype != torch.bool else flat.to(torch.uint8)
        s = torch.zeros((), dtype=torch.int64, device=t.device)
        for c in flat.split(_CHUNK):
            x = c.to(torch.int64) * _MULT
            x = x ^ (x >> 29)
            s = s + x.sum()
        total = total + s.to(home) * (2 * i + 1)
    return total


def _divergence_message(values: list, step) -> str:
    groups: dict = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    ref = max(groups.values(), key=lambda rs: (len(rs), -rs[0]))          # the majority (ties: rank 0's side)
    bad = sorted(r for rs in groups.values() if rs is not ref for r in rs)
    at = "" if step is None else f" at step {step}"
    return (f"data-parallel replicas diverged{at}: rank {bad[0]} differs (ranks {bad} disagree with ranks {ref}; "
            f"weight checksums by rank: {values}). Replicas must stay bit-identical: every rank must draw the same "
            "seeds, start from the same weights and use the same kernels")


def check_replicas(tensors, group=None, step=None) -> int:
    """All-gather `replica_checksum(tensors)` (a module or a list of tensors) and raise ReplicaDivergence if the
    ranks disagree. Returns the checksum. One collective; call it on every rank."""
    ck = replica_checksum(tensors)
    world = dist.get_world_size(group)
    if world == 1:
        return int(ck)
    dev = _collective_device(group, ck.device)
    out = torch.empty(world, dtype=torch.int64, device=dev)
    _all_gather(out, ck.reshape(1).to(dev), group)
    values = out.cpu().tolist()
    if len(set(values)) > 1:
        raise ReplicaDivergence(_divergence_message(values, step))
    return values[0]


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """all_gather_single where torch has it (2.14 deprecates all_gather_into_tensor), else all_gather_into_tensor."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _collective_device(group, fallback: torch.device) -> torch.device:
    """Where this group's collectives take their tensors: the current CUDA device for NCCL, else `fallback`."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and fallback.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


# ---------------------------------------------------------------------------------------------------- the hook
class LossAllGather:
    """ZOSGD's `loss_reduce` for data parallelism: one all-gather of every rank's step losses, combined in rank
    order (combine_losses). Every `check_every` steps (0: never) the same collective carries each rank's
    replica_checksum of `tensors` (8 more bytes), and a mismatch raises ReplicaDivergence on every rank (ZOSGD
    then skips the step, as it does for a failing closure, and re-raises)."""

    def __init__(self, group=None, reduce: str = "mean", check_every: int = 100, tensors=(), optimizer=None):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data parallel ZO needs an initialised torch.distributed process group "
                               "(dist.init_process_group, or mazo_kernels.distributed.init_from_env under torchrun)")
        self.group, self.reduce, self.check_every = group, reduce, check_every
        self.tensors = list(tensors)
        self.optimizer = optimizer
        self.calls = 0
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_checked_step = None

    def _step(self) -> int:
        if self.optimizer is not None:
            return self.optimizer._step_count - 1      # ZOSGD counts the step before it reduces its losses
        return self.calls - 1

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        local = local.detach().to(torch.float32).reshape(-1)
        k = local.numel()
        step = self._step()
        check = bool(self.check_every) and bool(self.tensors) and step % self.check_every == 0
        if self.world_size == 1 and not check:
            return combine_losses(local.reshape(1, k), self.reduce)
        dev = _collective_device(self.group, local.device)
        payload = local.to(dev)
        if check:
            ck = replica_checksum(self.tensors).to(dev).reshape(1).view(torch.float32)    # 8 bytes, carried as bits
            payload = torch.cat([payload, ck])
        out = torch.empty(self.world_size * payload.numel(), dtype=torch.float32, device=dev)
        _all_gather(out, payload, self.group)
        out = out.view(self.world_size, payload.numel())
        if check:
            values = out[:, k:].contiguous().view(torch.int64).reshape(-1).cpu().tolist()
            self.last_checked_step = step
            if len(set(values)) > 1:
                raise ReplicaDivergence(_divergence_message(values, step))
        return combine_losses(out[:, :k], self.reduce).to(local.device)


def data_parallel(optimizer, group=None, reduce: str = "mean", check_every: int = 100) -> LossAllGather:
    """Make a ZOSGD data parallel over `group` (default: the world): installs a LossAllGather as its loss_reduce.

    Every rank must build the optimizer with the same seed over the same initial weights, and call step() once per
    global step with a closure over its own micro-batch. reduce="mean" (the global loss is the mean of the ranks'
    losses: equal micro-batch sizes make it the mean over the global batch) or "sum". check_every: steps between
    replica checks (checksums of the replicated trainable tensors; sharded DTensor parameters are not replicas and
    are left out). Checks the replicas once now (a separate collective), so a run that starts from different
    weights fails at once."""
    from .optim import ZOSGD
    if not isinstance(optimizer, ZOSGD):
        raise TypeError(f"data_parallel takes a mazo_kernels.ZOSGD, got {type(optimizer).__name__}")
    replicated = [e.tensor for pt in optimizer._parts for e in pt.plan.entries if e.full_numel is None]
    hook = LossAllGather(group, reduce, check_every, replicated, optimizer)
    if replicated and hook.world_size > 1:
        check_replicas(replicated, group, step=optimizer._step_count)
    optimizer.loss_reduce = hook
    return hook


# ---------------------------------------------------------------------------------------------------- shards
def _local_shape_and_offset(shape, mesh, placements):
    """Fallback for torch versions without compute_local_shape_and_global_offset: Shard / Replicate placements
    with torch.chunk semantics (the layout FSDP2 and DTensor use)."""
    local, offset = list(shape), [0] * len(shape)
    coord = mesh.get_coordinate()
    for i, pl in enumerate(placements):
        if type(pl).__name__ == "Replicate":
            continue
        d, n, c = pl.dim, mesh.size(i), coord[i]
        chunk = -(-local[d] // n)
        start = min(c * chunk, local[d])
        size = max(0, min(chunk, local[d] - start))
        offset[d] += start
        local[d] = size
    return tuple(local), tuple(offset)


def local_shard(p, name: str = "tensor"):
    """(local tensor, flat offset of the shard in the full tensor, full numel) of a DTensor parameter.

    The local shard must be one contiguous range of the full tensor in row-major order (FSDP2's Shard(0) always
    is: rows [start, start + n) of the full tensor; uneven and empty shards included). Placements other than
    Shard and Replicate (Partial, strided shards of FSDP + tensor parallel) and shards that are not a contiguous
    range (e.g. Shard(1) of a matrix) are refused: their elements' global indices are not one offset away."""
    for pl in p.placements:
        if type(pl).__name__ not in ("Shard", "Replicate"):
            raise NotImplementedError(f"{name!r}: DTensor placement {pl} is not supported; ZO sharding needs Shard or "
                                      "Replicate placements (FSDP2's Shard(0))")
    local = p.to_local().detach()
    gshape = tuple(p.shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        lshape, offs = compute_local_shape_and_global_offset(gshape, p.device_mesh, p.placements)
    except ImportError:
        lshape, offs = _local_shape_and_offset(gshape, p.device_mesh, p.placements)
    lshape, offs = tuple(lshape), tuple(offs)
    if tuple(local.shape) != lshape:
        raise ValueError(f"{name!r}: local shard has shape {tuple(local.shape)}, expected {lshape} for global shape "
                         f"{gshape} under {p.placements} (padded local tensors are not supported)")
    full = math.prod(gshape)
    strides = [math.prod(gshape[j + 1:]) for j in range(len(gshape))]
    flat = sum(o * s for o, s in zip(offs, strides))
    if local.numel() == 0:
        return local, min(flat, full), full
    differing = [j for j in range(len(gshape)) if lshape[j] != gshape[j]]
    if differing and any(lshape[j] != 1 for j in range(differing[-1])):
        raise NotImplementedError(f"{name!r}: the local shard {lshape} at offset {offs} of {gshape} is not a "
                                  "contiguous range of the full tensor (shard along dim 0, as FSDP2 does)")
    return local, flat, full


def full_state(module) -> dict:
    """{name: full tensor} of a module whose parameters may be DTensors (FSDP2): all-gathers sharded ones (a
    collective: call on every rank). For saving, and for comparing runs across rank counts."""
    out = {}
    for n, p in module.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------- launch
def init_from_env(backend: str | None = None):
    """Under torchrun (WORLD_SIZE > 1 in the environment): initialise the default process group if needed (NCCL
    with one GPU per process, LOCAL_RANK's, when CUDA is available; else gloo). Returns (rank, world_size,
    local_rank); (0, 1, 0) for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, 0
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def sync_masks(masks, src: int = 0, group=None):
    """Make every rank's masks rank `src`'s (in place; returns masks). Masks computed from gradients on a GPU can
    differ in the last bits between ranks; the replicas need the same ones. Names, kinds and shapes must match."""
    from .masks import BitMask, RowIndexMask, ThresholdMask
    if masks is None:
        return None
    desc = []
    for n in sorted(masks):
        m = masks[n]
        t = m.bits if isinstance(m, BitMask) else m.cols if isinstance(m, RowIndexMask) else None
        desc.append((n, type(m).__name__, None if t is None else tuple(t.shape)))
    got = [desc]
    dist.broadcast_object_list(got, src=src, group=group)
    if got[0] != desc:
        raise ValueError("sync_masks: ranks have different masks (names, kinds or shapes differ); build them from "
                         "the same model and settings on every rank")
    taus = [float(masks[n].tau) for n in sorted(masks) if isinstance(masks[n], ThresholdMask)]
    if taus:
        box = [taus]
        dist.broadcast_object_list(box, src=src, group=group)
        it = iter(box[0])
        for n in sorted(masks):
            if isinstance(masks[n], ThresholdMask):
                masks[n].tau = next(it)
    for n in sorted(masks):
        m = masks[n]
        t = m.bits if isinstance(m, BitMask) else m.cols if isinstance(m, RowIndexMask) else None
        if t is not None:
            dev = _collective_device(group, t.device)
            buf = t.to(dev)
            dist.broadcast(buf, src=src, group=group)
            if buf is not t:
                t.copy_(buf)
    return masks


__all__ = ["ReplicaDivergence", "combine_losses", "micro_batch_closure", "shard_batch", "replica_checksum",
           "check_replicas", "LossAllGather", "data_parallel", "local_shard", "full_state", "init_from_env",
           "sync_masks"]
