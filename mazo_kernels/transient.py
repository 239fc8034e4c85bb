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
"""
from __future__ import annotations

import contextlib

import torch

from . import reference as ref
from .ops import zo_apply_
from .plan import ZOPlan


class TransientPerturber:
    """Forward hooks that show every owning module a perturbed copy of its trainable weights.

    module:   the model whose forwards the closure runs.
    entries:  {id(parameter): (parameter, PlanEntry)} for the trainable weights (PlanEntry.tensor is the stored
              weight, a detached alias of the parameter's storage).
    make_tables: builds the per-dtype launch tables (with per-tensor scale multipliers) for a sub-plan.
    """

    def __init__(self, module: torch.nn.Module, entries: dict, make_tables):
        self._owners = []          # (module, [(param, entry)], tables)
        found = set()
        for mod in module.modules():
            own, seen = [], set()
            for _, p in mod.named_parameters(recurse=False):
                if id(p) in entries and id(p) not in seen:
                    seen.add(id(p))
                    own.append(entries[id(p)])
            if own:
                tables = make_tables(ZOPlan([e for _, e in own]))
                self._owners.append((mod, own, tables))
                found.update(id(p) for p, _ in own)
        missing = [e.name for k, (_, e) in entries.items() if k not in found]
        if missing:
            raise ValueError(f"transient mode: parameters {missing} are not parameters of the module given as "
                             "module=; pass the model whose forward the closure runs")
        self._swapped: dict = {}   # id(param) -> (param, stored tensor)

    @property
    def tables(self):
        return [t for _, _, tables in self._owners for t in tables]

    def _swap_in(self, own, tables, seed_bits, scale, dist, backend):
        empty = torch.zeros(0, dtype=torch.float32, device=own[0][1].tensor.device)
        copies = {}
        for t in tables:
            outs = [torch.empty_like(x) for x in t.tensors]
            zo_apply_(t.tensors, outs, t.masks, t.meta, t.fvals, [seed_bits], empty, ref.OP_COPY, dist,
                      ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, scale, 0.0, 0.0, backend)
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
            yield
        finally:
            for h in handles:
                h.remove()
            self.restore_all()
