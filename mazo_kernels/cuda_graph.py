"""ZOSGD steps replayed from a CUDA graph: for small models, where launching a step costs more than running it.

A step of a ~125 M model is ~20 ms of Python and launches around ~4 ms of GPU work (docs/E2E.md). `GraphedZOStep`
captures one whole step (the +eps pass, the closure's forward, the -eps pass, the second forward, the loss
difference and the fused restore + update) once, and replays it for every step. What changes from step to step
lives in device memory that the captured kernels read:

- the step's seeds (direction, stochastic-rounding) are written into a small int64 device tensor before each replay
  (`seed_dev`: the kernels read it in place of seeds passed as launch arguments), from the same `step_seeds` as an
  eager step, so a replayed step is the eager step with the same index, bit for bit where the forwards are;
- the per-group multipliers (lr, eps, weight decay: LR schedulers work) are the plan's device tables, updated by
  device fills before the replay, and the reference eps that divides the loss difference is a device scalar;
- the closure must read its batch from tensors it owns and refills before `step()` (the usual CUDA-graph rule:
  a replay reads the same addresses).

With `ZOSGD(lookahead=True)` the captured step starts at its first forward: the previous step's update applied the
+eps pass, and the captured update applies the next step's (its seed is one more device value). Where the weights do
not carry it (the first step; a step after an eps change, which settles the carried pass), it is applied eagerly
before the replay. So a lookahead step replays two passes and two forwards.

The seed log gets the same record as an eager step, with the projected gradient copied out of the graph's output
on the device (no host synchronisation), so `mazo_kernels.replay` reproduces the run.
Limits (checked, with a message): in-place mode, one device, forward_mode="eval", no loss_reduce (data parallel),
no FSDP, the cuda, triton or fastest backend. A non-finite loss skips the update on the device, as in an eager step; an
exception inside a replay cannot happen in Python, and a closure that fails during warm-up or capture leaves the
weights restored (the warm-up steps are eager ZOSGD steps).
"""
from __future__ import annotations

import torch

from .api import _seed_bits
from .optim import (DISTS, ROUNDINGS, ZOSGD, kernel_grads, loss_keys, run_pass, run_update, schedule,
                    step_seeds)

_RING = 4       # pinned staging buffers for the seeds: the host may run this many steps ahead of the GPU


class GraphedZOStep:
    """opt.step(closure) captured in a CUDA graph. Usage::

        static_ids = ids_of_first_batch.clone()          # the closure reads its inputs from here
        closure = lambda: model(input_ids=static_ids, labels=static_ids).loss
        step = mk.GraphedZOStep(opt, closure)            # warm-up steps (real steps), then the capture
        for ids in batches:
            static_ids.copy_(ids)
            loss = step()                                # one ZO step; a device tensor, overwritten by the next

    warmup: eager steps run before the capture (they are ordinary training steps, logged as such); at least one,
    so that every kernel's tables are on the device. use_graph=False runs the same device-seeded step eagerly (for
    CPU tests and debugging; then the device may be the CPU).
    """

    def __init__(self, opt: ZOSGD, closure, *, warmup: int = 1, use_graph: bool = True):
        if not isinstance(opt, ZOSGD):
            raise TypeError(f"GraphedZOStep wraps a mazo_kernels.ZOSGD, got {type(opt).__name__}")
        if not callable(closure):
            raise TypeError("closure must be callable (runs a forward, returns the loss)")
        why = []
        if opt.mode != "inplace":
            why.append("mode='inplace' (the transient mode's per-module copies are made by forward hooks)")
        if len(opt._parts) != 1:
            why.append("the trainable tensors on one device")
        if opt.loss_reduce is not None:
            why.append("no loss_reduce (a collective per step)")
        if opt.forward_mode != "eval" and opt.module is not None:
            why.append("forward_mode='eval' (train mode re-seeds the RNG for every forward)")
        if opt._fsdp_modules:
            why.append("no FSDP (its forwards all-gather)")
        if use_graph:
            if opt._device.type != "cuda":
                why.append("CUDA tensors")
            if opt.backend not in ("cuda", "triton", "fastest"):
                why.append("the cuda, triton or fastest backend")
        if why:
            raise ValueError("GraphedZOStep needs " + "; ".join(why))
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < (1 if use_graph else 0):
            raise ValueError(f"warmup must be an int >= {1 if use_graph else 0}, got {warmup!r}")
        self.opt, self.closure, self.use_graph = opt, closure, bool(use_graph)
        dev = opt._device
        q = opt.num_perturbations
        # [restore seed, direction seeds..., (next step's first seed: lookahead), sr seed]: the update reads all of
        # it, pass j reads [1 + j, 2 + j]
        self._seed_dev = torch.zeros(q + 2 + opt.lookahead, dtype=torch.int64, device=dev)
        self._eps_ref = torch.ones((), dtype=torch.float32, device=dev)
        pin = dev.type == "cuda"
        self._ring = [torch.zeros(q + 2 + opt.lookahead, dtype=torch.int64, pin_memory=pin) for _ in range(_RING)]
        self._events = [None] * _RING
        self._graph = None
        self._out = None
        for _ in range(warmup):
            self._eager_warmup_step()
        if self.use_graph:
            self._capture()

    # ------------------------------------------------------------------ host side of a step
    def _next_seed(self, k: int):
        """lookahead: the first direction seed of step k + 1, which step k's update applies; else None."""
        if not self.opt.lookahead:
            return None
        return step_seeds(self.opt._base_seed, k + 1, self.opt.num_perturbations)[0][0]

    def _prepare(self):
        """Validate the groups, write multipliers and this step's seeds to the device; return the log record.
        lookahead: where the weights do not carry this step's first perturbation (the first step, or after an eps
        change settled it), apply it here, eagerly; the captured step starts at its first forward."""
        opt = self.opt
        seeds, sr_seed, _, eps_ref, record = opt._begin_step()
        k = record["step"]
        self._eps_ref.fill_(eps_ref)
        nxt = self._next_seed(k)
        if opt.lookahead:
            if opt._carry is None:
                opt._run_pass(schedule("inplace", opt.estimator, seeds)[0][0], DISTS[opt.dist])
            opt._carry = None       # consumed by this step (as ZOSGD.step does)
        vals_dev = ([_seed_bits(seeds[-1])] + [_seed_bits(s) for s in seeds]
                    + ([_seed_bits(nxt)] if nxt is not None else []) + [_seed_bits(sr_seed)])
        slot = k % _RING
        if self._events[slot] is not None:
            self._events[slot].synchronize()   # the copy that last used this buffer has been done
        buf = self._ring[slot]
        buf.copy_(torch.tensor(vals_dev, dtype=torch.int64))
        self._seed_dev.copy_(buf, non_blocking=buf.is_pinned())
        if buf.is_pinned():
            ev = torch.cuda.Event()
            ev.record()
            self._events[slot] = ev
        return seeds, sr_seed, record

    # ------------------------------------------------------------------ the device side (what is captured)
    def _body(self, seeds, sr_seed, progress=None):
        """The step's passes, forwards and update, seeds read from _seed_dev. `seeds` are this step's values: the
        kernels take the count and the equality pattern from them (distinct directions, restore == last)."""
        opt = self.opt
        pt = opt._parts[0]
        dist = DISTS[opt.dist]
        q = opt.num_perturbations
        items, final = schedule("inplace", opt.estimator, seeds)
        if opt.lookahead:
            items = items[1:]       # the first pass: carried from the previous step's update, or made in _prepare
        index = {s: j for j, s in enumerate(seeds)}
        losses = {}
        with opt._forward_mode():
            for item in items:
                if progress is not None:
                    progress.append(item)     # an item counts as done once started (a pass cannot half-fail)
                if item[0] == "P":
                    j = index[item[1]]
                    run_pass(pt.tables, item, dist, pt.backend, pt.empty, self._seed_dev[1 + j:3 + j])
                else:
                    losses[item[1]] = opt._forward(self.closure, 0, None)
        two = opt.estimator == "two_sided"
        vec = torch.stack([losses[key] for key in loss_keys(opt.estimator, q)])
        if two:
            lp, lm = vec[:q], vec[q:2 * q]
            g_raw = (lp - lm) / (self._eps_ref * 2.0)
            estimate = torch.cat([lp, lm]).mean()
        else:
            g_raw = (vec[1:1 + q] - vec[0]) / self._eps_ref
            estimate = vec[0]
        finite = torch.isfinite(g_raw).all()
        gs = kernel_grads(g_raw, finite, opt.sign)
        run_update(pt.tables, seeds, final, gs, finite, dist, ROUNDINGS[opt.rounding], sr_seed, pt.backend,
                   pt.lr_col, self._seed_dev, next_seed=self._next_seed(opt._step_count))
        return estimate, g_raw, finite

    def _carry_next(self, record):
        """lookahead: the update applied step k + 1's first perturbation with this step's eps (as ZOSGD does)."""
        if self.opt.lookahead:
            self.opt._carry = (self._next_seed(record["step"]), tuple(record["eps"]))

    def _finish(self, record, out):
        estimate, g_raw, finite = out
        self.opt._step_count += 1
        self._carry_next(record)
        self.opt._log.append({**record, "error": None}, g_raw=g_raw, finite=finite)
        return estimate

    def _eager_warmup_step(self):
        """An ordinary eager ZOSGD step (it puts every kernel's tables on the device; a failing closure restores
        the weights there). torch's recipe: warm up on a side stream before capturing."""
        if not self.use_graph:
            return self.opt.step(self.closure)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                return self.opt.step(self.closure)
        finally:
            torch.cuda.current_stream().wait_stream(side)

    def _eager_body(self, seeds, sr_seed, record):
        """_body without a graph; if the closure raises, the weights are restored as ZOSGD.step does it: the
        remaining passes run without forwards, then the update with g = 0 and lr = 0, and the step is logged as
        skipped."""
        opt = self.opt
        pt = opt._parts[0]
        try:
            return self._body(seeds, sr_seed, progress := [])
        except BaseException as exc:
            q = opt.num_perturbations
            opt._step_count += 1
            if progress and progress[-1][0] == "P":     # a kernel failed: the weights' state is unknown
                opt._log.append({**record, "g_bits": [0x7FC00000] * q, "skipped": True,
                                 "error": f"{type(exc).__name__} in a perturb pass"})
                raise
            dist = DISTS[opt.dist]
            items, final = schedule("inplace", opt.estimator, seeds)
            if opt.lookahead:
                items = items[1:]
            index = {s: j for j, s in enumerate(seeds)}
            for item in items[len(progress):]:
                if item[0] == "P":
                    j = index[item[1]]
                    run_pass(pt.tables, item, dist, pt.backend, pt.empty, self._seed_dev[1 + j:3 + j])
            zero = torch.zeros(q, dtype=torch.float32, device=opt._device)
            no = torch.zeros((), dtype=torch.bool, device=opt._device)
            run_update(pt.tables, seeds, final, zero, no, dist, ROUNDINGS[opt.rounding], sr_seed, pt.backend,
                       pt.lr_col, self._seed_dev, next_seed=self._next_seed(record["step"]))
            self._carry_next(record)
            opt._log.append({**record, "g_bits": [0x7FC00000] * q, "skipped": True,
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
            raise

    def _capture(self):
        opt = self.opt
        seeds, sr_seed = step_seeds(opt._base_seed, opt._step_count, opt.num_perturbations)[:2]
        self._graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self._graph):
            self._out = self._body(seeds, sr_seed)

    # ------------------------------------------------------------------ public
    def __call__(self):
        """Run one ZO step; returns the loss estimate (a device tensor that the next step overwrites)."""
        seeds, sr_seed, record = self._prepare()
        if self._graph is not None:
            self._graph.replay()
            out = self._out
        else:
            out = self._eager_body(seeds, sr_seed, record)
        return self._finish(record, out)

    step = __call__

    @property
    def captured(self) -> bool:
        return self._graph is not None
