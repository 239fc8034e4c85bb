"""Transient mode: forwards see perturbed copies, the stored weights are never written, tied weights agree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mazo_kernels as mk

BACKEND = "cpu" if mk.has_cpu() else "reference"
# (device, backend): the block-grouping tests also run on a GPU through both GPU backends and "fastest", the
# default there (skipped without one)
_GPU = torch.cuda.is_available()
_HAS = {"cuda": mk.has_cuda, "triton": mk.has_triton, "fastest": lambda: mk.has_cuda() and mk.has_triton()}
DEVICE_BACKENDS = [pytest.param("cpu", BACKEND, id="cpu")] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.skipif(
        not (_GPU and _HAS[b]()), reason=f"needs a GPU and the {b} backend"))
    for b in ("cuda", "triton", "fastest")]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_llama(dtype, tie):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _expected_copy(name, stored, seed, scale):
    entry = mk.PlanEntry(name, stored, mk.stable_tensor_id(name))
    return mk.perturbed_copy(entry, seed, scale, backend="reference")


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
@pytest.mark.parametrize("group_bytes", [0, None])   # one copy launch per owning module; blocks (here: the model)
def test_forwards_see_perturbed_copies_and_never_write(estimator, group_bytes):
    model = _tiny_llama(torch.bfloat16, tie=False)
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    eps = 1e-2
    (seed,), _, _ = mk.step_seeds(17, 0, 1)
    seen = {}                         # name -> weights each forward saw, in order
    by_param = {p: n for n, p in model.named_parameters()}

    def capture(mod, _args, _out):
        for _, p in mod.named_parameters(recurse=False):
            seen.setdefault(by_param[p], []).append(p.detach().clone())
        if group_bytes == 0:  # only this module's weights are swapped: every other parameter is the stored tensor
            for n, q in model.named_parameters():
                if all(q is not p for p in mod.parameters(recurse=False)):
                    assert q.data_ptr() == ptrs[n], n

    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_hook(capture)

    def closure():
        for n, p in model.named_parameters():      # between module forwards: the stored weights, untouched
            assert p.data_ptr() == ptrs[n] and torch.equal(p.detach(), stored[n]), n
        return model(input_ids=ids, labels=ids).loss

    opt = mk.ZOSGD(model.named_parameters(), lr=0.0, eps=eps, mode="transient", module=model, seed=17,
                   estimator=estimator, backend=BACKEND, transient_group_bytes=group_bytes)
    assert opt._transient.launch_groups == (1 if group_bytes is None else
                                           sum(1 for m in model.modules() if any(True for _ in m.parameters(False))))
    opt.step(closure)
    scales = [eps, -eps] if estimator == "two_sided" else [None, eps]
    for n, views in seen.items():
        assert len(views) == 2, n
        for v, s in zip(views, scales):
            want = stored[n] if s is None else _expected_copy(n, stored[n], seed, s)
            assert torch.equal(v, want), n
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), stored[n]) and p.data_ptr() == ptrs[n], n


@pytest.mark.parametrize("mode", ["transient", "inplace"])
def test_tied_weights_see_one_consistent_perturbation(mode):
    model = _tiny_llama(torch.float32, tie=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert head.weight is emb.weight
    stored = emb.weight.detach().clone()
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    views = {"emb": [], "head": []}
    emb.register_forward_hook(lambda m, a, o: views["emb"].append(m.weight.detach().clone()))
    head.register_forward_hook(lambda m, a, o: views["head"].append(m.weight.detach().clone()))
    opt = mk.ZOSGD(model.named_parameters(), lr=0.0, eps=1e-3, mode=mode, module=model, seed=4, backend=BACKEND)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    (seed,), _, _ = mk.step_seeds(4, 0, 1)
    assert len(views["emb"]) == len(views["head"]) == 2
    for i, s in enumerate([1e-3, -1e-3]):
        assert torch.equal(views["emb"][i], views["head"][i])
        want = _expected_copy("model.embed_tokens.weight", stored, seed, s)
        if mode == "transient" or i == 0:
            assert torch.equal(views["emb"][i], want)
        else:   # in place, -eps comes from undoing +eps: equal except where +eps crossed into a coarser binade
            assert (views["emb"][i] == want).float().mean() > 0.9
    assert head.weight is emb.weight


class Net(nn.Module):
    def __init__(self, dtype, lo=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                if lo is None:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                else:        # magnitudes in [1.1 lo, 1.45 lo]: no +-eps*z crosses a binade upwards
                    mag = lo * (1.1 + 0.35 * torch.rand(p.shape, generator=g))
                    p.copy_(mag * torch.sign(torch.randn(p.shape, generator=g)))
        self.register_buffer("x", torch.randn(64, 16, generator=g))
        self.to(dtype)

    def forward(self):
        return self.b(torch.tanh(self.a(self.x))).float().pow(2).mean()


def _run(mode, dtype, lo=None, lr=1e-2, steps=3):
    net = Net(dtype, lo)
    opt = mk.ZOSGD(net.named_parameters(), lr=lr, eps=1e-3, weight_decay=0.1, mode=mode, module=net, seed=8,
                   backend=BACKEND)
    for _ in range(steps):
        opt.step(net)
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_transient_step_equals_inplace_step_up_to_the_restore_error():
    """fp32 weights of magnitude in [1.1, 1.45]: no perturbed value lands in a coarser binade, so the in-place
    restore is exact except at rounding ties (docs/NOISE_SPEC.md, condition (b)); the modes may differ only there."""
    start = {n: p.detach() for n, p in Net(torch.float32, lo=1.0).named_parameters()}
    lr0 = _run("inplace", torch.float32, lo=1.0, lr=0.0, steps=1)
    inexact = {n: lr0[n] != start[n] for n in start}
    assert sum(int(m.sum()) for m in inexact.values()) <= 0.01 * sum(m.numel() for m in inexact.values())
    a, b = _run("transient", torch.float32, lo=1.0, lr=1e-4, steps=1), _run("inplace", torch.float32, lo=1.0,
                                                                               lr=1e-4, steps=1)
    for n in start:
        assert not torch.equal(a[n], start[n]), n
        differ = a[n] != b[n]
        assert not (differ & ~inexact[n]).any(), n
        assert torch.equal(a[n][~inexact[n]], b[n][~inexact[n]])


def test_transient_has_no_restore_drift_in_bf16():
    start = {n: p.detach() for n, p in Net(torch.bfloat16).named_parameters()}
    t0, i0 = _run("transient", torch.bfloat16, lr=0.0, steps=5), _run("inplace", torch.bfloat16, lr=0.0, steps=5)
    for n in start:
        assert torch.equal(t0[n], start[n]), n                 # exact by construction
        assert (i0[n] != start[n]).float().mean() < 0.2, n     # in place: only the binade-crossing elements move
    # with lr > 0 the two modes differ only through the in-place restore error
    t1, i1 = _run("transient", torch.bfloat16), _run("inplace", torch.bfloat16)
    for n in start:
        assert not torch.equal(t1[n], start[n])
        torch.testing.assert_close(t1[n].float(), i1[n].float(), rtol=0, atol=4 * 2.0 ** -7 * 0.1)


def test_exception_inside_a_module_forward_restores_the_parameters():
    net = Net(torch.bfloat16)
    stored = {n: p.detach().clone() for n, p in net.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in net.named_parameters()}

    def fail(_m, _a):
        raise RuntimeError("inside b")

    opt = mk.ZOSGD(net.named_parameters(), lr=1e-2, mode="transient", module=net, backend=BACKEND)
    h = net.b.register_forward_pre_hook(fail)     # registered first: runs before ours, while a's copy is live
    with pytest.raises(RuntimeError, match="inside b"):
        opt.step(net)
    h.remove()
    for n, p in net.named_parameters():
        assert p.data_ptr() == ptrs[n] and torch.equal(p.detach(), stored[n]), n
    opt.step(net)
    assert not torch.equal(net.a.weight.detach(), stored["a.weight"])


def _layer_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_copies_equal_per_module_copies(dtype, device, backend):
    """The copies made per block (a decoder layer, or the whole model) are the per-module copies: same losses and
    weights, bit for bit, over steps with lr > 0; fewer launch groups."""
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for gb in (0, "layer", None):
        model = _tiny_llama(dtype, tie=True).to(device)
        size = _layer_bytes(model) if gb == "layer" else gb
        opt = mk.ZOSGD(model.named_parameters(), lr=1e-2, eps=1e-2, mode="transient", module=model, seed=5,
                       backend=backend, transient_group_bytes=size)
        losses = [opt.step(lambda: model(input_ids=ids, labels=ids).loss).item() for _ in range(3)]
        runs[gb] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()},
                    opt._transient.launch_groups, opt._transient.sentinel_swaps)
    per_module, layer, whole = runs[0], runs["layer"], runs[None]
    assert whole[2] == 1 and per_module[2] > layer[2] > 1       # 2 layers + embed + norm (+ tied head): 4-5 groups
    for other in (layer, whole):
        assert other[0] == per_module[0]
        for n, w in per_module[1].items():
            assert torch.equal(other[1][n], w), n
        assert other[3] == 0                                     # every block's forward ran


class _Holder(nn.Module):       # a container whose forward is never called: its parent calls its children
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 16)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.h = _Holder()
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.register_buffer("x", torch.randn(8, 16, generator=g))

    def forward(self):
        return self.head(torch.tanh(self.h.l2(torch.tanh(self.h.l1(self.x))))).pow(2).mean()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_a_block_whose_forward_is_not_called_still_sees_copies(device, backend):
    """A block module that the model never calls (it only holds submodules): the owning modules' own pre-hooks swap
    their copies in, so the step equals the per-module one."""
    out = {}
    for gb in (0, "holder"):
        net = _Outer().to(device)
        size = sum(p.numel() * p.element_size() for p in net.h.parameters()) if gb else 0
        opt = mk.ZOSGD(net.named_parameters(), lr=1e-2, eps=1e-2, mode="transient", module=net, seed=9,
                       backend=backend, transient_group_bytes=size)
        losses = [opt.step(net).item()]
        for g in opt.param_groups:    # new multipliers reach the tables a sentinel builds on first use
            g["lr"], g["eps"] = 5e-3, 2e-2
        losses += [opt.step(net).item() for _ in range(2)]
        out[gb] = (losses, {n: p.detach().clone() for n, p in net.named_parameters()}, opt._transient.sentinel_swaps)
    assert out["holder"][2] > 0 and out[0][2] == 0
    assert out["holder"][0] == out[0][0]
    for n, w in out[0][1].items():
        assert torch.equal(out["holder"][1][n], w), n


def test_transient_group_bytes_is_checked():
    net = Net(torch.float32)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="transient_group_bytes"):
            mk.ZOSGD(net.named_parameters(), mode="transient", module=net, transient_group_bytes=bad)
