"""The example of docs/FOR_LIBRARIES.md, run: a MeZO-style trainer's zo_perturb_parameters / zo_update mapped onto
perturb_ / update_, against the original per-parameter torch arithmetic (with the same noise), in float32."""
import numpy as np
import pytest
import torch

import mazo_kernels as mk

from mazo_kernels import tasks as T
from mazo_kernels.tiny import tiny_llama

BACKEND = "cpu" if mk.has_cpu() else "reference"


def _no_decay(name):
    return "bias" in name or "layer_norm" in name or "layernorm" in name


class MeZOStyle:
    """princeton-nlp/MeZO's trainer.py arithmetic (zo_perturb_parameters, zo_step, zo_update), with its
    torch.normal(...) under torch.manual_seed replaced by mk.noise so that both implementations draw the same z."""

    def __init__(self, model, eps, lr, weight_decay):
        self.model, self.eps, self.lr, self.wd = model, eps, lr, weight_decay
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _z(self, name, param):
        z = mk.noise(self.zo_random_seed, mk.stable_tensor_id(name), 0, param.numel(), backend=BACKEND)
        return z.view_as(param).to(param.dtype)

    def zo_perturb_parameters(self, scaling_factor=1):
        for name, param in self.named_parameters_to_optim:
            param.data = param.data + scaling_factor * self._z(name, param) * self.eps

    def zo_step(self, loss_fn, seed):
        self.zo_random_seed = seed
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = loss_fn()
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = loss_fn()
        self.projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self):
        for name, param in self.named_parameters_to_optim:
            z = self._z(name, param)
            if not _no_decay(name):
                param.data = param.data - self.lr * (self.projected_grad * z + self.wd * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)


class FusedMeZO(MeZOStyle):
    """The same trainer methods on top of mazo_kernels: the mapping of docs/FOR_LIBRARIES.md, verbatim."""

    def __init__(self, model, eps, lr, weight_decay, fused_restore=True):
        super().__init__(model, eps, lr, weight_decay)
        # once: weight decay per tensor, as MeZO's name rule says
        self.plan = mk.ZOPlan([mk.PlanEntry(n, p.data, mk.stable_tensor_id(n),
                                            weight_decay=0.0 if _no_decay(n) else weight_decay)
                               for n, p in self.named_parameters_to_optim])
        self.fused_restore = fused_restore
        self.carry = 0                    # the weights hold theta + carry * eps * z(seed)

    def zo_perturb_parameters(self, scaling_factor=1):
        new = self.carry + scaling_factor
        if new == 0 and self.fused_restore:
            # MeZO's final +1 is the restore: fold it into zo_update's pass (one pass over the weights saved)
            self.pending_restore, self.carry = self.carry, 0
            return
        mk.perturb_(self.plan, self.zo_random_seed, new * self.eps, prior=self.carry * self.eps, backend=BACKEND)
        self.carry = new

    def zo_update(self):
        prior = self.pending_restore * self.eps if self.fused_restore else 0.0
        mk.update_(self.plan, [self.zo_random_seed], [self.projected_grad], lr=self.lr,
                   restore_seed=self.zo_random_seed, prior=prior, rounding="nearest", backend=BACKEND)


@pytest.mark.parametrize("fused_restore", [True, False])
def test_mezo_style_loop_matches_fused_calls(fused_restore):
    eps, lr, wd, steps = 1e-3, 1e-4, 5.0, 6      # wd large enough that its effect (~1e-5 per step) is checked
    tasks = T.load_tasks([__file__.replace("test_for_libraries.py", "data/task_sentiment.jsonl")])
    exs = tasks["task_sentiment"]
    ref_model, tok = tiny_llama(seed=9)
    ours_model, _ = tiny_llama(seed=9)
    ref_model.eval()
    ours_model.eval()
    start = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    ref, ours = MeZOStyle(ref_model, eps, lr, wd), FusedMeZO(ours_model, eps, lr, wd, fused_restore)
    rng = np.random.RandomState(0)
    grads = []
    for step in range(steps):
        batch = T.training_batch(tok, exs[4 * step:4 * step + 4])
        seed = int(rng.randint(1000000000))
        with torch.no_grad():
            l_ref = ref.zo_step(lambda: T.batch_loss(ref_model, batch), seed)
            l_ours = ours.zo_step(lambda: T.batch_loss(ours_model, batch), seed)
        ref.zo_update()
        ours.zo_update()
        assert ours.carry == 0
        grads.append((ref.projected_grad, ours.projected_grad))
        if step == 0:     # from the same weights, +eps*z is computed identically: the first loss is bit-identical
            assert l_ref.item() == l_ours.item()
    for g_ref, g_ours in grads:
        # the -eps forward differs: MeZO's theta + eps z - 2 eps z is not theta - eps z in float32 (~1 ulp of the
        # weights), which moves the loss by ~1e-7 and g = dL / 2eps by ~1e-4
        assert abs(g_ref - g_ours) < 2e-3 * max(1.0, abs(g_ref))
    moved = 0.0
    for (n, p_ref), (_, p_ours) in zip(ref_model.named_parameters(), ours_model.named_parameters()):
        moved = max(moved, (p_ours - start[n]).abs().max().item())
        # to rounding: MeZO's restore leaves ~1 ulp (~1e-9 here) per step, and lr * (g difference) * z adds ~1e-7
        torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=2e-6)
    assert moved > 1e-4          # the updates themselves are far larger than the tolerance
