"""MaZO masks: hand-checked combination and top-k, format choice, scorers against naive computations, the mask
file, frozen weights through ZO training, and argument errors."""
import importlib
import math

import pytest
import torch
from torch import nn

import mazo_kernels as mk
from mazo_kernels import reference as ref
from mazo_kernels.importance import gradient_task_score

mm = importlib.import_module("mazo_kernels.mask_builder")


def _selection(mask, shape):
    """Dense bool selection of a BitMask / RowIndexMask (test oracle, via the reference unpacker)."""
    rows, cols = shape
    if isinstance(mask, mk.BitMask):
        return ref.unpack_bits(mask.bits.cpu(), rows * cols).reshape(rows, cols)
    sel = torch.zeros(rows, cols, dtype=torch.bool)
    sel.scatter_(1, mask.cols.cpu().long(), True)
    return sel


def _sel_from_cols(rows_of_cols, cols):
    sel = torch.zeros(len(rows_of_cols), cols, dtype=torch.bool)
    for r, cs in enumerate(rows_of_cols):
        sel[r, cs] = True
    return sel


# ------------------------------------------------------------------------------------------- hand-checked
def test_hand_checked_two_tasks():
    # Task A rows: [1,1,2,4] (sum 8), [3,0,1,0] (sum 4), [2,2,2,2], [0,0,0,0]
    # Task B rows: [10,30,20,40] (sum 100), [0,0,0,0] (sum 0 -> stays 0), [1,1,1,1], [0,0,0,0]
    a = torch.tensor([[1., 1, 2, 4], [3, 0, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
    b = torch.tensor([[10., 30, 20, 40], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    # row-normalised by hand and summed:
    # row0: [.125,.125,.25,.5] + [.1,.3,.2,.4] = [.225,.425,.45,.9]
    # row1: [.75,0,.25,0] + 0;  row2: [.25]*4 + [.25]*4 = [.5]*4 (an exact four-way tie);  row3: all 0
    expected = torch.tensor([[.225, .425, .45, .9], [.75, 0, .25, 0], [.5, .5, .5, .5], [0, 0, 0, 0]])
    combined = mk.combine_task_scores([a, b])
    torch.testing.assert_close(combined, expected)
    # k = floor(0.5*4 + 0.5) = 2. row0: top two are .9 (col 3) and .45 (col 2) -- without the row normalisation
    # task B's raw scale would win and pick cols 1 and 3. row1: .75 (0), .25 (2). row2, row3: ties -> lowest index.
    masks = mk.mazo_masks({"w": [a, b]}, 0.5, format="rows")
    assert masks["w"].cols.tolist() == [[2, 3], [0, 2], [0, 1], [0, 1]]
    assert mk.mazo_masks({"w": a + b}, 0.5, format="rows")["w"].cols.tolist()[0] == [1, 3]   # unnormalised
    # k = floor(0.75*4 + 0.5) = 3: row1 has a tie between col 1 and col 3 (both 0) -> col 1
    masks = mk.mazo_masks({"w": [a, b]}, 0.75, format="bits")
    assert torch.equal(_selection(masks["w"], (4, 4)),
                       _sel_from_cols([[1, 2, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]], 4))
    info = masks.info["w"]
    assert (info.kind, info.shape, info.k, info.selected, info.target) == ("bits", (4, 4), 3, 12, 0.75)
    assert info.density == 0.75
    # the same scores given pre-combined give the same mask
    assert torch.equal(mk.mazo_masks({"w": combined}, 0.75, format="bits")["w"].bits, masks["w"].bits)


def test_gradient_task_score_by_hand():
    w = torch.tensor([[2.0, -1.0]])
    mean_g = torch.tensor([[0.5, 0.25]])
    mean_g2 = torch.tensor([[1.0, 4.0]])
    # |g w| = [1, .25]; ½ F w² = [.5*1*4, .5*4*1] = [2, 2]; |w| = [2, 1]
    assert gradient_task_score(w, mean_g, mean_g2, 1.0, 0.0).tolist() == [[3.0, 2.25]]
    assert gradient_task_score(w, mean_g, mean_g2, 1.0, 0.5).tolist() == [[4.0, 2.75]]
    assert gradient_task_score(w, mean_g, mean_g2, 0.0, 0.0).tolist() == [[1.0, 0.25]]


def test_density_to_k():
    assert mk.density_to_k(0.5, 4) == 2
    assert mk.density_to_k(0.3, 10) == 3
    assert mk.density_to_k(0.25, 6) == 2        # 1.5 -> halves up
    assert mk.density_to_k(1e-6, 100) == 1      # never a fully frozen row
    assert mk.density_to_k(1.0, 7) == 7


# ------------------------------------------------------------------------------------------- formats
def test_bits_vs_rows_by_size():
    # [4, 64]: bits = 4*64/8 = 32 B; rows = 4*4*k B -> k=1: 16 B (rows), k=2: 32 B (tie: bits), k=3: 48 B (bits)
    s = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    for density, kind, nbytes in ((1 / 64, "rows", 16), (2 / 64, "bits", 32), (3 / 64, "bits", 32)):
        masks = mk.mazo_masks({"w": s}, density)
        m = masks["w"]
        assert masks.info["w"].kind == kind
        assert isinstance(m, mk.RowIndexMask if kind == "rows" else mk.BitMask)
        t = m.cols if kind == "rows" else m.bits
        assert t.numel() * t.element_size() == nbytes
        k = masks.info["w"].k
        assert mm.mask_bytes(kind, 4, 64, k) == nbytes
        assert nbytes == min(mm.mask_bytes("rows", 4, 64, k), mm.mask_bytes("bits", 4, 64, k))


def test_both_formats_same_selection_and_chunking(monkeypatch):
    g = torch.Generator().manual_seed(5)
    for rows, cols, density in ((7, 13, 0.3), (33, 9, 0.5), (16, 40, 0.1)):
        s = torch.rand(rows, cols, generator=g)
        k = mk.density_to_k(density, cols)
        # oracle: argsort each row in Python with (-score, col) keys
        exp = _sel_from_cols([sorted(sorted(range(cols), key=lambda c: (-float(s[r, c]), c))[:k])
                              for r in range(rows)], cols)
        for chunk in (1 << 24, 24, 1):       # whole, a few rows (not a multiple of 8 rows), one row per chunk
            monkeypatch.setattr(mm, "_ROW_CHUNK_ELEMS", chunk)
            bits = mk.mazo_masks({"w": s}, density, format="bits")["w"]
            rws = mk.mazo_masks({"w": s}, density, format="rows")["w"]
            assert torch.equal(bits.bits, ref.pack_bits(exp))
            assert torch.equal(_selection(rws, (rows, cols)), exp)
            assert rws.cols.dtype == torch.int32 and bool((rws.cols[:, 1:] > rws.cols[:, :-1]).all())


# ------------------------------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    def __init__(self, d_in=12, d_h=24, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_h)
        self.fc2 = nn.Linear(d_h, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_tasks(seed=0, n_tasks=2, n_batches=3):
    g = torch.Generator().manual_seed(seed)
    return {f"t{t}": [(torch.randn(8, 12, generator=g) * (1 + 3 * t), torch.randn(8, 6, generator=g))
                      for _ in range(n_batches)] for t in range(n_tasks)}


def _mlp_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _naive_gradient_scores(model, names, task_batches, loss_fn, alpha, beta):
    """All per-batch gradients at once with autograd.grad, then the formula written out."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for batches in task_batches.values():
        grads = {n: [] for n in names}
        for b in batches:
            gs = torch.autograd.grad(loss_fn(model, b), [params[n] for n in names])
            for n, gr in zip(names, gs):
                grads[n].append(gr.float())
        for n in names:
            w = params[n].detach().float()
            G1 = torch.stack(grads[n]).mean(0)
            F = (torch.stack(grads[n]) ** 2).mean(0)
            S = (G1 * w).abs() + alpha * 0.5 * F * w ** 2 + beta * w.abs()
            total[n] += S / S.sum(dim=1, keepdim=True)
    return total


def test_gradient_scorer_equals_naive_and_holds_one_gradient():
    torch.manual_seed(0)
    model = MLP()
    model.train()
    tasks = _mlp_tasks()
    sc = mk.GradientScorer(model, alpha=0.7, beta=0.3)
    assert sc.names == ["fc1.weight", "fc2.weight"] and sc.bytes_per_weight == 12
    live = []
    for p in model.parameters():   # registered before the scorer's hooks, so they run first
        p.register_post_accumulate_grad_hook(
            lambda p: live.append(sum(q.grad is not None for q in model.parameters())))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for t, batches in tasks.items():
        assert sc.score_task(batches, _mlp_loss, task=t) == 3
    # only scored weights got gradients, and never more than one existed at a time
    assert len(live) == 2 * 3 * 2 and max(live) == 1
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert sc.task_names == ["t0", "t1"] and sc.num_tasks == 2
    naive = _naive_gradient_scores(model, sc.names, tasks, _mlp_loss, 0.7, 0.3)
    for n in sc.names:
        torch.testing.assert_close(sc.combined_score(n), naive[n], rtol=1e-5, atol=1e-7)
        # each task's row shares sum to 1, so every row of the sum is the number of tasks
        torch.testing.assert_close(sc.combined_score(n).sum(1), torch.full((naive[n].shape[0],), 2.0))
    # bf16 accumulators: 6 bytes per weight, same scores to bf16 precision
    sc16 = mk.GradientScorer(model, alpha=0.7, beta=0.3, dtype=torch.bfloat16)
    for t, batches in tasks.items():
        sc16.score_task(batches, _mlp_loss)
    assert sc16.bytes_per_weight == 6
    for n in sc.names:
        torch.testing.assert_close(sc16.combined_score(n), naive[n], rtol=2e-2, atol=1e-4)


def _tiny_llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _llama_tasks(n_tasks=2, n_batches=2):
    g = torch.Generator().manual_seed(11)
    out = {}
    for t in range(n_tasks):
        lo = 48 * t   # the two tasks draw tokens from disjoint halves of the vocabulary
        out[f"t{t}"] = []
        for _ in range(n_batches):
            ids = torch.randint(lo, lo + 48, (2, 10), generator=g)
            out[f"t{t}"].append({"input_ids": ids, "labels": ids})
    return out


def test_gradient_scorer_on_hf_model_default_loss():
    model = _tiny_llama()
    tasks = _llama_tasks()
    sc = mk.GradientScorer(model)
    assert sc.names and all(p.dim() == 2 for p in map(sc.param, sc.names))
    assert not any("embed_tokens" in n or "lm_head" in n for n in sc.names)   # excluded by default
    assert any("q_proj" in n for n in sc.names) and any("down_proj" in n for n in sc.names)
    for batches in tasks.values():
        sc.score_task(batches)
    naive = _naive_gradient_scores(model, sc.names, tasks, lambda m, b: m(**b).loss, 1.0, 0.0)
    for n in sc.names:
        torch.testing.assert_close(sc.combined_score(n), naive[n], rtol=1e-5, atol=1e-7)
    masks = mk.mazo_masks(sc, 0.25)
    assert list(masks) == sc.names
    for n, m in masks.items():
        rows, cols = sc.param(n).shape
        assert masks.info[n].selected == rows * mk.density_to_k(0.25, cols)
        assert int(_selection(m, (rows, cols)).sum()) == masks.info[n].selected


def test_activation_scorer_equals_naive_mlp():
    torch.manual_seed(2)
    model = MLP()
    g = torch.Generator().manual_seed(3)
    tasks = {f"t{t}": [torch.randn(5, 4, 12, generator=g) * (1 + t) for _ in range(3)] for t in range(2)}
    sc = mk.ActivationScorer(model)
    for batches in tasks.values():
        sc.score_task(batches)
    assert sc.bytes_per_weight == pytest.approx(2 * 4 * (12 + 24) / (12 * 24 + 24 * 6))
    W1, W2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    exp1, exp2 = torch.zeros_like(W1), torch.zeros_like(W2)
    with torch.no_grad():
        for batches in tasks.values():
            x = torch.cat([b.reshape(-1, 12) for b in batches])     # every token of the task
            h = torch.tanh(model.fc1(x))
            for W, inp, exp in ((W1, x, exp1), (W2, h, exp2)):
                S = W.abs() * torch.linalg.vector_norm(inp, dim=0)[None, :]
                exp += S / S.sum(1, keepdim=True)
    torch.testing.assert_close(sc.combined_score("fc1.weight"), exp1)
    torch.testing.assert_close(sc.combined_score("fc2.weight"), exp2)


def test_activation_scorer_on_hf_model():
    model = _tiny_llama()
    tasks = _llama_tasks()
    sc = mk.ActivationScorer(model)
    assert not any("embed_tokens" in n or "lm_head" in n for n in sc.names)
    # naive: keep every input of every Linear, then norms and the formula
    inputs = {n: [] for n in sc.names}
    mods = {n: m for m_name, m in model.named_modules() for n in sc.names if n == m_name + ".weight"}
    per_task = []
    for batches in tasks.values():
        store = {n: [] for n in sc.names}
        hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1])))
              for n in sc.names]
        with torch.no_grad():
            for b in batches:
                model(**b)
        for h in hs:
            h.remove()
        per_task.append({n: torch.linalg.vector_norm(torch.cat(store[n]).float(), dim=0) for n in sc.names})
        sc.score_task(batches)
    for n in sc.names:
        W = sc.param(n).detach().float().abs()
        exp = sum((W * a[n][None]) / (W * a[n][None]).sum(1, keepdim=True) for a in per_task)
        torch.testing.assert_close(sc.combined_score(n), exp)
    a = mk.mazo_masks(sc, 0.3)
    b = mk.build_mazo_masks(model, tasks, 0.3, scorer="activation")
    assert list(a) == list(b)
    for n in a:
        assert mm.mask_kind(a[n]) == mm.mask_kind(b[n]) == "bits"
        assert torch.equal(a[n].bits, b[n].bits)


def test_activation_scorer_refuses_conv1d():
    import transformers  # noqa: F401
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(8, 4)
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(self.c(x))

    m = M()
    assert mk.ActivationScorer(m).names == ["lin.weight"]
    with pytest.raises(ValueError, match="'c.weight' is not the weight of an nn.Linear"):
        mk.ActivationScorer(m, names=["c.weight"])


# ------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_save_load_round_trip(tmp_path, fmt):
    torch.manual_seed(4)
    model = MLP()
    masks = mm.MaskDict()
    thr = mk.sparse_mezo_masks(model, 0.37)
    mz_bits = mk.build_mazo_masks(model, _mlp_tasks(1), 0.5, loss_fn=_mlp_loss, format="bits")
    mz_rows = mk.build_mazo_masks(model, _mlp_tasks(2), 0.1, loss_fn=_mlp_loss, format="rows")
    for src, n_src, n_dst in ((thr, "fc1.weight", "a.thr"), (mz_bits, "fc1.weight", "a.bits"),
                              (mz_rows, "fc2.weight", "a.rows")):
        masks[n_dst] = src[n_src]
        masks.info[n_dst] = src.info[n_src]
    masks["odd.tau"] = mk.ThresholdMask(math.nextafter(0.1, 1.0))   # a plain entry with no info: tau exact
    path = tmp_path / "masks.bin"
    mk.save_masks(path, masks, format=fmt)
    with open(path, "rb") as f:
        head = f.read(4)
    assert (head == b"PK\x03\x04") == (fmt == "torch")
    back = mk.load_masks(path)
    assert list(back) == list(masks)
    for n, m in masks.items():
        b = back[n]
        assert type(b) is type(m)
        if isinstance(m, mk.ThresholdMask):
            assert b.tau == m.tau
        elif isinstance(m, mk.BitMask):
            assert b.bits.dtype == torch.uint8 and torch.equal(b.bits, m.bits)
        else:
            assert b.cols.dtype == torch.int32 and torch.equal(b.cols, m.cols)
    for n in ("a.thr", "a.bits", "a.rows"):
        assert back.info[n] == masks.info[n]
    assert back.info["odd.tau"] == mm.MaskInfo("threshold")
    # the loaded masks drive a plan
    plan = mk.ZOPlan([("a.thr", model.fc1.weight.data), ("a.bits", torch.randn(24, 12)),
                      ("a.rows", torch.randn(6, 24))], masks=back)
    assert len(plan) == 3


def test_load_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match="not one written by save_masks"):
        mk.load_masks(p)
    from safetensors.torch import save_file
    q = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(q))
    with pytest.raises(ValueError, match="without the 'mazo_kernels.masks' header"):
        mk.load_masks(q)
    with pytest.raises(TypeError, match="mask for 'w': unknown mask type Tensor"):
        mk.save_masks(tmp_path / "y", {"w": torch.zeros(3)})


# ------------------------------------------------------------------------------------------- ZO training
def _zo_train(model, masks, x, y, steps=20, eps=1e-2, lr=5e-2):
    plan = mk.ZOPlan.from_module(model, masks=masks)

    def loss():
        with torch.no_grad():
            return float(((model(x).float() - y) ** 2).mean())

    for step in range(steps):
        seed = 777 + 104729 * step
        mk.perturb_(plan, seed, eps, backend="cpu")
        lp = loss()
        mk.perturb_(plan, seed, -eps, prior=eps, backend="cpu")
        lm = loss()
        g = (lp - lm) / (2 * eps)
        mk.update_(plan, [seed], [g], lr=lr, restore_seed=seed, prior=-eps, sr_seed=step, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["bits", "rows"])
def test_unselected_bit_identical_through_zo_training(dtype, fmt):
    torch.manual_seed(6)
    model = MLP()
    masks = mk.build_mazo_masks(model, _mlp_tasks(7), 0.3, loss_fn=_mlp_loss, format=fmt)
    model = model.to(dtype)
    masks = mm.MaskDict({n: m for n, m in masks.items()}, info=masks.info)
    x = torch.randn(32, 12).to(dtype)
    y = torch.randn(32, 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _zo_train(model, masks, x, y)
    for n, p in model.named_parameters():
        if n not in masks:
            continue
        sel = _selection(masks[n], tuple(p.shape))
        assert int(sel.sum()) == masks.info[n].selected
        a = p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        b = before[n].view(a.dtype)
        assert torch.equal(a[~sel], b[~sel]), f"{n}: an unselected weight was written"
        assert int((a[sel] != b[sel]).sum()) > 0.5 * int(sel.sum()), f"{n}: the selected weights did not train"


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0000001, 2, float("nan"), True, "0.5"])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\]"):
        mk.mazo_masks({"w": torch.rand(3, 4)}, bad)
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\]"):
        mk.build_mazo_masks(MLP(), _mlp_tasks(), bad, loss_fn=_mlp_loss)


def test_bad_arguments():
    model = MLP()
    with pytest.raises(ValueError, match="unknown parameter name 'fc9.weight'"):
        mk.GradientScorer(model, names=["fc9.weight"])
    with pytest.raises(ValueError, match="'fc1.bias' has shape \\(24,\\); GradientScorer takes 2-D weights"):
        mk.GradientScorer(model, names=["fc1.bias"])
    with pytest.raises(ValueError, match="'fc1.bias' has shape \\(24,\\); ActivationScorer takes 2-D weights"):
        mk.ActivationScorer(model, names=["fc1.bias"])
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        mk.GradientScorer(model, alpha=-1.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        mk.GradientScorer(model, beta=float("inf"))
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        mk.GradientScorer(model, dtype=torch.float16)
    with pytest.warns(UserWarning, match="no gradient reached 1 scored weight\\(s\\), e.g. \\['fc2.weight'\\]"):
        mk.GradientScorer(model).score_task([torch.randn(2, 12)], lambda m, x: m.fc1(x).pow(2).mean())
    with pytest.raises(ValueError, match="scores for 'b' have shape \\(5,\\); MaZO masks need 2-D weights"):
        mk.mazo_masks({"b": torch.rand(5)}, 0.5)
    with pytest.raises(ValueError, match="unknown parameter name 'x': no scores for it"):
        mk.mazo_masks({"w": torch.rand(3, 4)}, 0.5, names=["x"])
    sc = mk.GradientScorer(model)
    with pytest.raises(ValueError, match="no task scored yet"):
        mk.mazo_masks(sc, 0.5)
    with pytest.raises(ValueError, match="score_task got no batches"):
        sc.score_task([], _mlp_loss)
    with pytest.raises(ValueError, match="scores contain NaN"):
        mk.mazo_masks({"w": torch.tensor([[1.0, float("nan")]])}, 0.5)
    with pytest.raises(ValueError, match="format must be 'auto', 'bits' or 'rows'"):
        mk.mazo_masks({"w": torch.rand(3, 4)}, 0.5, format="dense")
    with pytest.raises(ValueError, match="scorer must be 'gradient' or 'activation'"):
        mk.build_mazo_masks(model, _mlp_tasks(), 0.5, scorer="hessian")
    with pytest.raises(TypeError, match="loss_fn must return a one-element loss tensor, got float"):
        mk.GradientScorer(model).score_task([None], lambda m, b: 3.0)
    with pytest.raises(TypeError, match="needs a dict batch"):
        mk.GradientScorer(model).score_task([torch.randn(2, 12)])
    # a failed task leaves flags, modes and weights as they were
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        sc.score_task([None], lambda m, b: m(torch.randn(2, 12)).sum() * float("nan"))
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sc.num_tasks == 0
