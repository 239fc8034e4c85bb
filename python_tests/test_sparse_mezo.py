"""Sparse MeZO thresholds: the selected count, exactly the small weights, ties, selection rules, frozen weights."""
import math

import pytest
import torch
from torch import nn

import mazo_kernels as mk
from mazo_kernels.sparse_mezo import TAU_ALL, frozen_count


def _expected_selection(w, sparsity):
    """Pure sort-based oracle: the n_sel smallest |w| in float32, with the elements equal to the boundary frozen."""
    a = w.detach().reshape(-1).float().abs()
    n = a.numel()
    n_sel = n - math.floor(sparsity * n + 0.5)
    if n_sel == n:
        return torch.ones(n, dtype=torch.bool).reshape(w.shape), n_sel
    boundary = torch.sort(a).values[n_sel]
    return (a < boundary).reshape(w.shape), n_sel


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.75, 0.9, 0.999])
def test_threshold_selects_exactly_the_smallest(sparsity):
    g = torch.Generator().manual_seed(int(sparsity * 1000) + 7)
    w = torch.randn(37, 53, generator=g)   # 1961 distinct magnitudes (almost surely): no ties
    tau = mk.magnitude_threshold(w, sparsity)
    sel = w.abs() < tau
    n = w.numel()
    n_sel = n - math.floor(sparsity * n + 0.5)
    assert int(sel.sum()) == n_sel
    # exactly the n_sel smallest magnitudes, by a sort
    order = torch.argsort(w.abs().reshape(-1))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[:n_sel]] = True
    assert torch.equal(sel.reshape(-1), expected)
    # tau is the smallest frozen magnitude (or FLT_MAX with nothing frozen) and a float32 value
    if n_sel < n:
        assert tau == float(w.abs().reshape(-1)[order[n_sel]])
    else:
        assert tau == TAU_ALL
    assert float(torch.tensor(tau, dtype=torch.float32)) == tau


def test_ties_freeze_the_boundary_by_hand():
    # |w| sorted: 0.1 0.2 0.3 0.3 0.3 0.5; s = 0.5 -> freeze 3, intend to select 3; the 4th smallest is 0.3,
    # so tau = 0.3 and all three 0.3 are frozen: only 0.1 and 0.2 are selected (fewer than 3, never more).
    w = torch.tensor([0.5, -0.1, 0.3, -0.3, 0.2, 0.3])
    assert frozen_count(6, 0.5) == 3
    tau = mk.magnitude_threshold(w, 0.5)
    assert tau == float(torch.tensor(0.3))
    assert (w.abs() < tau).tolist() == [False, True, False, False, True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ties_match_sort_oracle(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 48, generator=g) * 0.02).to(dtype)   # bf16 has many equal magnitudes
    short = 0
    for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        tau = mk.magnitude_threshold(w, s)
        sel = w.float().abs() < tau
        expected, n_sel = _expected_selection(w, s)
        assert torch.equal(sel, expected)
        assert int(sel.sum()) <= n_sel
        short += int(sel.sum()) < n_sel
    assert short > 0, "no tie straddled a boundary: the test did not exercise ties"


def test_frozen_count_rounding():
    assert frozen_count(100, 0.29) == 29         # 0.29*100 = 28.999999999999996 in float64: nearest, not floor
    assert frozen_count(7, 0.5) == 4             # 3.5: halves are frozen
    assert frozen_count(10, 0.04) == 0
    assert frozen_count(10, 0.96) == 10          # everything frozen: nothing selected, tau = min |w|
    w = torch.tensor([0.25, -0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    tau = mk.magnitude_threshold(w, 0.96)
    assert tau == 0.25 and int((w.abs() < tau).sum()) == 0


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc2(self.norm(torch.tanh(self.fc1(self.emb(ids))))).mean()


def test_module_selection_rules():
    torch.manual_seed(0)
    m = Tiny()
    masks = mk.sparse_mezo_masks(m, 0.5)
    assert list(masks) == ["emb.weight", "fc1.weight", "fc2.weight"]          # 2-D only
    for n, p in m.named_parameters():
        if n in masks:
            info = masks.info[n]
            assert info.kind == "threshold" and info.shape == tuple(p.shape) and info.target == 0.5
            assert info.selected == int((p.detach().abs() < masks[n].tau).sum())
            assert info.selected == p.numel() - frozen_count(p.numel(), 0.5)
    masks = mk.sparse_mezo_masks(m, 0.5, dims=(1, 2), exclude_embeddings=True)
    assert list(masks) == ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]
    masks = mk.sparse_mezo_masks(m, 0.5, include="fc*", exclude=["*fc2*"])
    assert list(masks) == ["fc1.weight"]
    masks = mk.sparse_mezo_masks(m, 0.5, include=lambda n, t: t.shape[0] == 4)
    assert list(masks) == ["fc2.weight"]
    m.fc1.weight.requires_grad_(False)
    assert "fc1.weight" not in mk.sparse_mezo_masks(m, 0.5)
    # named pairs (no module structure): embeddings recognised by name
    pairs = [("model.embed_tokens.weight", torch.randn(5, 4)), ("model.q_proj.weight", torch.randn(4, 4))]
    assert list(mk.sparse_mezo_masks(pairs, 0.5, exclude_embeddings=True)) == ["model.q_proj.weight"]
    assert list(mk.sparse_mezo_masks(dict(pairs), 0.5)) == ["model.embed_tokens.weight", "model.q_proj.weight"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        mk.sparse_mezo_masks(Tiny(), bad)


def test_bad_names_and_patterns():
    m = Tiny()
    with pytest.raises(ValueError, match="unknown parameter name 'fc3.weight'"):
        mk.sparse_mezo_masks(m, 0.5, names=["fc3.weight"])
    with pytest.raises(ValueError, match="'fc1.bias' has shape \\(16,\\); sparse_mezo_masks takes 2-D"):
        mk.sparse_mezo_masks(m, 0.5, names=["fc1.bias"])
    assert list(mk.sparse_mezo_masks(m, 0.5, names=["fc1.bias"], dims=(1,))) == ["fc1.bias"]
    with pytest.raises(ValueError, match="pattern 'attn.\\*' matches no parameter name"):
        mk.sparse_mezo_masks(m, 0.5, include="attn.*")
    with pytest.raises(ValueError, match="NaN or infinity"):
        mk.magnitude_threshold(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(TypeError, match="expected a \\(name, tensor\\) pair"):
        mk.sparse_mezo_masks([torch.randn(3, 3)], 0.5)


# ------------------------------------------------------------------------------------ frozen through training
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _zo_train(model, masks, x, y, steps=20, eps=1e-2, lr=5e-2):
    plan = mk.ZOPlan.from_module(model, masks=masks)

    def loss():
        with torch.no_grad():
            return float(((model(x).float() - y) ** 2).mean())

    for step in range(steps):
        seed = 12345 + 7919 * step
        mk.perturb_(plan, seed, eps, backend="cpu")
        lp = loss()
        mk.perturb_(plan, seed, -eps, prior=eps, backend="cpu")
        lm = loss()
        g = (lp - lm) / (2 * eps)
        mk.update_(plan, [seed], [g], lr=lr, restore_seed=seed, prior=-eps, sr_seed=step, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_bit_identical_through_zo_training(dtype):
    torch.manual_seed(1)
    model = MLP().to(dtype)
    x = torch.randn(32, 12).to(dtype)
    y = torch.randn(32, 6)
    masks = mk.sparse_mezo_masks(model, 0.6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n: before[n].float().abs() >= masks[n].tau for n in masks}
    _zo_train(model, masks, x, y)
    for n, p in model.named_parameters():
        if n not in masks:
            continue
        f = frozen[n]
        assert int(f.sum()) == frozen_count(p.numel(), 0.6)
        a = p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        b = before[n].view(a.dtype)
        assert torch.equal(a[f], b[f]), f"{n}: a frozen weight was written"
        assert int((a[~f] != b[~f]).sum()) > 0.5 * int((~f).sum()), f"{n}: the selected weights did not train"
