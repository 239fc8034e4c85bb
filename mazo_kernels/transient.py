"""Transient perturbation: forwards see theta + scale*z while the stored weights are never written.

In-place ZO perturbs the stored weights and undoes the perturbation afterwards; in bf16 the undo cannot be exact
for every element (docs/NOISE_SPEC.md, "Restore: when it is exact"). Here each module that owns trainable weights
gets, just before its forward, a perturbed copy of those weights (one `zo_apply_` COPY launch per dtype), swapped
in through `param.data`; the module's forward hook swaps the stored tensor back and the copy is freed. The extra
memory is one module's weights at a time, and the stored weights stay bit-identical, so the update pass needs no
restore (prior 0).

Why `param.data` swapping rather than torch.nn.utils.parametrize or torch.func.functional_call: it keeps the
Parameter objects (so tied weights -- one Parameter owned by two modules, e.g. LLaMA's lm_head and embed_tokens --
stay tied, and optimizers, hooks and state dicts that key on the Parameter are unaffected), it works on any module
whose forward reads its parameters at call time (every transformers model), and it needs no change to the model.
Tied weights get one consistent perturbation because the noise is keyed by the tensor id, which belongs to the one
tensor: each owning module computes the same copy from the same (seed, id, index).

Granularity. One launch per owning module is ~7 launches per transformer layer, and each launch has a host cost
(the op dispatch; Triton's argument packing). With `group_bytes` > 0 the copies are made per *block* instead: the
largest submodules whose trainable weights (all of their subtree) fit in `group_bytes` get one launch per dtype for
all of them, in their forward pre-hook (for a LLaMA, one decoder layer per launch: ~35 launches per forward instead
of ~230). The extra memory is then one block's weights. A block module whose forward is never called while its
children are (a container the model iterates over) would leave its weights unperturbed, so every owning module
inside a block keeps a light pre-hook that checks its weights are swapped in and, if not, swaps them in itself.
"""
from __future__ import annotations

import contextlib

import torch

from . import reference as ref
from .ops import zo_apply_
from .plan import ZOPlan


def _plan_groups(module: torch.nn.Module, entries: dict, group_bytes: int):
    """[(module, [(param, entry)], is_block)]: blocks (whole subtrees of at most group_bytes trainable bytes) and,
    outside them, each owning module's own trainable weights (as with group_bytes = 0). Tied weights may be in
    several groups (each computes the same copy)."""
    groups = []

    def own_of(mod, recurse):
        own, seen = [], set()
        for _, p in mod.named_parameters(recurse=recurse):
            if id(p) in entries and id(p) not in seen:
                seen.add(id(p))
                own.append(entries[id(p)])
        return own

    def visit(mod):
        sub = own_of(mod, True)
        if not sub:
            return
        if group_bytes > 0 and sum(e.tensor.numel() * e.tensor.element_size() for _, e in sub) <= group_bytes:
            groups.append((mod, sub, True))
            return
        own = own_of(mod, False)
        if own:
            groups.append((mod, own, False))
        for child in mod.children():
            visit(child)

    visit(module)
    return groups


class TransientPerturber:
    """Forward hooks that show every owning module a perturbed copy of its trainable weights.

    module:   the model whose forwards the closure runs.
    entries:  {id(parameter): (parameter, PlanEntry)} for the trainable weights (PlanEntry.tensor is the stored
              weight, a detached alias of the parameter's storage).
    make_tables: builds the per-dtype launch tables (with per-tensor scale multipliers) for a sub-plan.
    group_bytes: 0 for one launch per owning module; else blocks of at most this many bytes (module docstring).
    """

    def __init__(self, module: torch.nn.Module, entries: dict, make_tables, group_bytes: int = 0):
        self._make_tables = make_tables
        self._owners = []          # (module, [(param, entry)], tables): the launches, in module order
        self._sentinels = []       # (module, [(param, entry)], [tables] built on first use): owners inside a block
        self._mults = None         # the multipliers last synced into the tables (sentinel tables built later)
        found = set()
        for mod, own, is_block in _plan_groups(module, entries, group_bytes):
            self._owners.append((mod, own, make_tables(ZOPlan([e for _, e in own]))))
            found.update(id(p) for p, _ in own)
            if is_block:
                for sub in mod.modules():
                    sown = [entries[id(p)] for _, p in sub.named_parameters(recurse=False) if id(p) in entries]
                    if sown:
                        self._sentinels.append((sub, list({id(p): (p, e) for p, e in sown}.values()), []))
        missing = [e.name for k, (_, e) in entries.items() if k not in found]
        if missing:
            raise ValueError(f"transient mode: parameters {missing} are not parameters of the module given as "
                             "module=; pass the model whose forward the closure runs")
        self._swapped: dict = {}   # id(param) -> (param, stored tensor)
        self.sentinel_swaps = 0    # how often a sentinel had to swap (a block whose forward was not called)

    @property
    def launch_groups(self) -> int:
        """Launch groups per forward (blocks and owning modules outside blocks)."""
        return len(self._owners)

    @property
    def tables(self):
        """Every launch table built so far."""
        return [t for _, _, tables in self._owners for t in tables] + \
               [t for _, _, built in self._sentinels for tables in built for t in tables]

    def sync(self, mults: list):
        """Write the step's per-group multipliers (eps, lr, weight decay) into every table, as the optimizer does for
        its own (a sentinel's tables, built on first use, get them then)."""
        self._mults = mults
        for t in self.tables:
            t.sync(mults)

    def _sentinel_tables(self, own, built):
        if not built:
            # built inside a forward, which may run under torch.inference_mode(): the tables are kept and written in
            # later steps, so they must be normal tensors
            with torch.inference_mode(False), torch.no_grad():
                tables = self._make_tables(ZOPlan([e for _, e in own]))
            if self._mults is not None:
                for t in tables:
                    t.sync(self._mults)
            built.append(tables)
        return built[0]

    def _swap_in(self, own, tables, seed_bits, scale, dist, backend):
        empty = torch.zeros(0, dtype=torch.float32, device=own[0][1].tensor.device)
        copies = {}
        for t in tables:
            outs = [torch.empty_like(x) for x in t.tensors]
            zo_apply_(t.tensors, outs, t.masks, t.meta, t.fvals, [seed_bits], empty, ref.OP_COPY, dist,
                      ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, scale, 0.0, 0.0, backend,
                      dense_aligned=t.dense_aligned)
            for e, o in zip(t.entries, outs):
                copies[id(e)] = o
        for p, e in own:
            self._swapped[id(p)] = (p, e.tensor)
            p.data = copies[id(e)]

    def _swap_out(self, own):
        for p, e in own:
            if id(p) in self._swapped:
                p.data = e.tensor
                del self._swapped[id(p)]

    def restore_all(self):
        """Put every stored tensor back (after an exception the forward hooks may not have run)."""
        for p, stored in list(self._swapped.values()):
            p.data = stored
        self._swapped.clear()

    @contextlib.contextmanager
    def perturbed(self, seed_bits: int, scale: float, dist: int, backend: str):
        """Within the block, each owning module's forward sees rne(theta + scale*scale_mult*m*z(seed))."""
        handles = []
        try:
            for mod, own, tables in self._owners:
                def pre(_m, _args, own=own, tables=tables):
                    self._swap_in(own, tables, seed_bits, scale, dist, backend)

                def post(_m, _args, _out, own=own):
                    self._swap_out(own)

                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post))
            for mod, own, built in self._sentinels:
                mine = []   # what this sentinel swapped in itself (its block's forward was not called)

                def spre(_m, _args, own=own, built=built, mine=mine):
                    if all(id(p) in self._swapped for p, _ in own):
                        return
                    self._swap_in(own, self._sentinel_tables(own, built), seed_bits, scale, dist, backend)
                    self.sentinel_swaps += 1
                    mine.append(own)

                def spost(_m, _args, _out, mine=mine):
                    while mine:
                        self._swap_out(mine.pop())

                handles.append(mod.register_forward_pre_hook(spre))
                handles.append(mod.register_forward_hook(spost))
            yield
        finally:
            for h in handles:
                h.remove()
            self.restore_all()
