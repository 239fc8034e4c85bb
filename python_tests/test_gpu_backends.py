"""GPU execution: cuda and compiled triton against the reference, bit for bit. Runs only where CUDA is available
(bench/gpu_check.sh runs it on the GPU machine and commits the summary under bench/results/)."""
import re

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [b for b in ("cuda", "triton") if (b == "triton" and mk.has_triton()) or (b == "cuda" and mk.has_cuda())]
# "fastest": each pass on cuda or triton (mazo_kernels/backend_policy.py); a masked 16-bit step mixes the two
STEP_BACKENDS = GPU_BACKENDS + (["fastest"] if len(GPU_BACKENDS) == 2 else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t):
    return t.detach().cpu().contiguous().view(BITS[t.dtype])


def _weights(gen, sizes, dtype, device):
    out = []
    for n in sizes:
        w = torch.randn(n, generator=gen) * 0.02
        w[::7] *= 50.0
        out.append(w.to(dtype).to(device))
    return out


def _plan(tensors, masks=None, kw=None):
    kw = kw or {}
    entries = []
    for i, t in enumerate(tensors):
        e = mk.PlanEntry(f"layer{i}.weight", t, mk.stable_tensor_id(f"layer{i}.weight"), **kw.get(i, {}))
        if masks and i in masks:
            e.mask = masks[i]
        entries.append(e)
    return mk.ZOPlan(entries)


def _masks_for(tensors, gen, device):
    m = {}
    m[0] = mk.ThresholdMask(0.02)
    sel = torch.rand(tensors[1].numel(), generator=gen) < 0.3
    m[1] = mk.BitMask.from_bool(sel.to(device))
    return m


def test_backends_present():
    assert "triton" in GPU_BACKENDS, "triton must run compiled on the GPU machine"
    assert "cuda" in GPU_BACKENDS, f"CUDA extension not built: {mk._backends._load_cuda_ext()}"


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
@pytest.mark.parametrize("masked", [False, True])
def test_step_matches_reference(backend, dtype, dist, masked):
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), dist, masked)) % 2 ** 31)
    sizes = [1000, 333, 1, 0, 4099, 129]
    w_gpu = _weights(gen, sizes, dtype, "cuda")
    w_cpu = [t.cpu().clone() for t in w_gpu]
    masks_gpu = _masks_for(w_gpu, gen, "cuda") if masked else None
    masks_cpu = ({0: masks_gpu[0], 1: mk.BitMask(masks_gpu[1].bits.cpu())} if masked else None)
    mults = {2: dict(scale_mult=0.5, lr_mult=2.0, weight_decay=0.1), 4: dict(global_offset=2 ** 33 + 3,
                                                                          full_numel=2 ** 34)}
    p_gpu, p_cpu = _plan(w_gpu, masks_gpu, mults), _plan(w_cpu, masks_cpu, mults)
    seed, eps = 2 ** 64 - 17, 1e-3
    for plan, b in ((p_gpu, backend), (p_cpu, "reference")):
        mk.perturb_(plan, seed, eps, dist=dist, backend=b)
    assert all(torch.equal(_bits(a), _bits(c)) for a, c in zip(w_gpu, w_cpu))
    for plan, b in ((p_gpu, backend), (p_cpu, "reference")):
        mk.perturb_(plan, seed, -eps, prior=eps, dist=dist, backend=b)
    assert all(torch.equal(_bits(a), _bits(c)) for a, c in zip(w_gpu, w_cpu))
    g_gpu = torch.tensor([0.7, -1.3], device="cuda")
    for plan, b, g in ((p_gpu, backend, g_gpu), (p_cpu, "reference", [0.7, -1.3])):
        mk.update_(plan, [seed, 99], g, lr=1e-2, restore_seed=seed, prior=-eps, rounding="stochastic",
                   sr_seed=5, dist=dist, backend=b)
    assert all(torch.equal(_bits(a), _bits(c)) for a, c in zip(w_gpu, w_cpu))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_noise_and_copy_match_reference(backend):
    for dist in ("gaussian", "rademacher", "gaussian_fast"):
        z = mk.noise(2 ** 63 + 5, 123, 2 ** 32 - 7, 5000, dist=dist, device="cuda", backend=backend)
        zr = mk.noise(2 ** 63 + 5, 123, 2 ** 32 - 7, 5000, dist=dist, backend="reference")
        assert torch.equal(_bits(z), _bits(zr))
    gen = torch.Generator().manual_seed(3)
    w = _weights(gen, [777], torch.bfloat16, "cuda")[0]
    e = mk.PlanEntry("x", w, 5)
    out = torch.full_like(w, float("nan"))
    mk.perturbed_copy(e, 11, 1e-3, out=out, backend=backend)
    ref_out = mk.perturbed_copy(mk.PlanEntry("x", w.cpu(), 5), 11, 1e-3, backend="reference")
    assert torch.equal(_bits(out), _bits(ref_out))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("k", [27, 9, 3])  # CUDA: element units (27, 9 of 53 columns) and entry units (3)
def test_rowindex_mask_matches_reference(backend, k):
    gen = torch.Generator().manual_seed(4 + k)
    rows, cols = 37, 53
    w = (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16()
    idx = torch.stack([torch.randperm(cols, generator=gen)[:k].sort().values for _ in range(rows)]).int()
    wg = w.cuda()
    pg = mk.ZOPlan([mk.PlanEntry("w", wg, 9, mask=mk.RowIndexMask(idx.cuda()))])
    pc = mk.ZOPlan([mk.PlanEntry("w", w, 9, mask=mk.RowIndexMask(idx))])
    mk.perturb_(pg, 8, 1e-3, backend=backend)
    mk.perturb_(pc, 8, 1e-3, backend="reference")
    assert torch.equal(_bits(wg), _bits(w))
    mk.perturb_(pg, 8, -1e-3, prior=1e-3, backend=backend)
    mk.perturb_(pc, 8, -1e-3, prior=1e-3, backend="reference")
    assert torch.equal(_bits(wg), _bits(w))
    mk.update_(pg, [8], [0.7], lr=1e-2, restore_seed=8, prior=-1e-3, sr_seed=3, backend=backend)
    mk.update_(pc, [8], [0.7], lr=1e-2, restore_seed=8, prior=-1e-3, sr_seed=3, backend="reference")
    assert torch.equal(_bits(wg), _bits(w))


def test_cuda_and_triton_agree_on_a_tensor_past_2_31_elements():
    """One real tensor of 2^31 + 1001 bf16 elements: cuda and triton agree everywhere; chunks at the start,
    around 2^31 and at the end agree with the reference."""
    if len(GPU_BACKENDS) < 2:
        pytest.skip("needs both GPU backends")
    n = 2 ** 31 + 1001
    free, _ = torch.cuda.mem_get_info()
    assert free > 3 * n * 2, "not enough GPU memory for the large-tensor check"
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
    w0 = w.clone()
    seed = 2 ** 64 - 3
    mk.perturb_(mk.ZOPlan([mk.PlanEntry("big", w, 77)]), seed, 1e-3, backend="cuda")
    w_cuda = w.clone()
    w.copy_(w0)
    mk.perturb_(mk.ZOPlan([mk.PlanEntry("big", w, 77)]), seed, 1e-3, backend="triton")
    assert torch.equal(w.view(torch.int16), w_cuda.view(torch.int16))
    del w_cuda
    for start in (0, 2 ** 31 - 4096, n - 5000):
        stop = min(n, start + 8192)
        idx = torch.arange(start, stop)
        base = w0[start:stop].float().cpu()
        expect = ref.to_storage(base + ref._f32(1e-3) * ref.gaussian(seed, 77, idx), torch.bfloat16)
        assert torch.equal(w[start:stop].cpu().view(torch.int16), expect.view(torch.int16)), start


KERNEL_VARIANTS = [(d, "") for d in DTYPES] + [(torch.bfloat16, "MAZO_CUDA_HW_BF16=0"),
                                                 (torch.float32, "MAZO_CUDA_F32_XOR=0"),
                                                 (torch.float32, "MAZO_CUDA_F32_XOR=1"),
                                                 (torch.float16, "MAZO_CUDA_HW_F16=0"),
                                                 # masked tensors: element units instead of the masked kernels'
                                                 # fast path; the whole-unit store experiment
                                                 (torch.bfloat16, "MAZO_CUDA_MASKED_FAST=0"),
                                                 (torch.bfloat16, "MAZO_CUDA_WHOLE_UNITS=1")]


@pytest.mark.skipif(not mk.has_cuda(), reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype,variant", KERNEL_VARIANTS, ids=[f"{d}-{v or 'default'}" for d, v in KERNEL_VARIANTS])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
@pytest.mark.parametrize("spec", ["1", "0"])
def test_cuda_specialised_and_generic_kernels_match_reference(dtype, variant, dist, spec, monkeypatch):
    """The CUDA extension runs perturb_, the restoring update_ and (default storage kernels) the transient mode's
    perturbed_copy and update_ with prior 0 in kernels specialised on (op, prior != 0, dist); MAZO_CUDA_SPEC=0
    forces the generic kernel. Both against the reference, on tensors spanning several blocks of
    8192 elements (the block -> tensor walk), with masks and an unaligned global offset among them. bf16 runs with
    the hardware rounding (the default) and with MAZO_CUDA_HW_BF16=0 (integer rounding); fp32 with the
    warp-coalesced fast path where it is the default, off (MAZO_CUDA_F32_XOR=0) and on every call (=1); fp16 with
    the hardware conversions (the default) and the integer ones (MAZO_CUDA_HW_F16=0). Threshold and packed-bit
    masks run the masked kernels' fast path (default) and element units (MAZO_CUDA_MASKED_FAST=0)."""
    monkeypatch.setenv("MAZO_CUDA_SPEC", spec)
    if variant:
        monkeypatch.setenv(*variant.split("="))
    gen = torch.Generator().manual_seed(hash((str(dtype), dist, spec, variant)) % 2 ** 31)
    sizes = [70001, 3 * 8192, 65544, 17, 8200, 5000, 9003]  # the last: whole warps, a part warp and a tail
    w_gpu = _weights(gen, sizes, dtype, "cuda")
    w_cpu = [t.cpu().clone() for t in w_gpu]
    kw = {1: dict(scale_mult=0.5, lr_mult=2.0, weight_decay=0.1), 4: dict(global_offset=8 * 1001 + 5,
                                                                       full_numel=10 ** 6)}
    bits = torch.rand(sizes[2], generator=gen) < 0.4
    masks_gpu = {5: mk.ThresholdMask(0.02), 0: mk.ThresholdMask(0.03), 2: mk.BitMask.from_bool(bits.cuda())}
    masks_cpu = {5: mk.ThresholdMask(0.02), 0: mk.ThresholdMask(0.03), 2: mk.BitMask.from_bool(bits)}
    p_gpu, p_cpu = _plan(w_gpu, masks_gpu, kw), _plan(w_cpu, masks_cpu, kw)

    def same(what):
        bad = [i for i, (a, c) in enumerate(zip(w_gpu, w_cpu)) if not torch.equal(_bits(a), _bits(c))]
        assert not bad, f"{what}: tensors {bad} differ from the reference (MAZO_CUDA_SPEC={spec} {variant})"
        lat = [i for i, (a, c) in enumerate(zip(p_gpu.groups[0].masks, p_cpu.groups[0].masks))
               if not torch.equal(a.cpu(), c)]
        assert not lat, f"{what}: masks / latches {lat} differ from the reference"

    seed, eps = 2 ** 63 + 12345, 1e-3
    for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
        mk.perturb_(plan, seed, eps, dist=dist, backend=b)
    same("perturb_, prior 0")
    for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
        mk.perturb_(plan, seed, -2 * eps, prior=eps, dist=dist, backend=b)
    same("perturb_ with a prior")
    for rounding in ("stochastic", "nearest"):
        for seeds, g in (([seed], [0.31]), ([seed, 7, 2 ** 64 - 3], [0.7, -1.3, 0.05])):
            for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
                gg = torch.tensor(g, device="cuda") if b == "cuda" else g
                mk.update_(plan, seeds, gg, lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding, sr_seed=9,
                           dist=dist, backend=b)
            same(f"update_ with restore, {len(seeds)} seeds, {rounding}")
            for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
                mk.perturb_(plan, seed, -eps, dist=dist, backend=b)   # carry a perturbation into the next restore
            same("perturb_ between updates")
    for rounding in ("nearest", "stochastic"):   # prior 0 (the transient mode's update): the threshold evaluated
        for seeds, g in (([11], [0.2]), ([11, 2 ** 64 - 5], [0.2, -0.9])):
            for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
                gg = torch.tensor(g, device="cuda") if b == "cuda" else g
                mk.update_(plan, seeds, gg, lr=1e-2, rounding=rounding, sr_seed=5, dist=dist, backend=b)
            same(f"update_ with prior 0, {len(seeds)} seeds, {rounding}")
    copies = {}
    for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
        outs = [torch.full_like(e.tensor, float("nan")) for e in plan.entries]
        copies[b] = mk.perturbed_copy(plan, seed, 0.3, out=outs, dist=dist, backend=b)
    bad = [i for i, (a, c) in enumerate(zip(copies["cuda"], copies["reference"])) if not torch.equal(_bits(a), _bits(c))]
    assert not bad, f"perturbed_copy: tensors {bad} differ from the reference"


# Row-index shapes for the masked kernels' block bitmaps: a block (8192 elements) over two rows of 4096; rows of 11008
# (a block ends inside a row); rows of 53 (many rows per block, a partial tail unit); k * 8 == row_len (the last
# element-unit case); k * 8 < row_len (entry units, the generic path); an empty mask (k = 0). (rows, cols, k)
ROWIDX_SHAPES = [(5, 4096, 2048), (3, 11008, 5504), (301, 53, 27), (40, 1000, 125), (33, 640, 40), (7, 96, 0)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
@pytest.mark.parametrize("variant", ["", "MAZO_CUDA_MASKED_FAST=0", "tk.ASM=0", "tk.ASM=1"])
def test_rowindex_masks_in_a_mixed_plan_match_reference(backend, dtype, dist, variant, monkeypatch):
    """Every op over a plan of row-index masked weights of several shapes (one with a global offset that is not a
    multiple of 8, which leaves the fast path), beside an unmasked and a packed-bit masked tensor: bit for bit
    against the reference. On CUDA the row-index tensors run the masked kernels' block bitmaps (default) or element
    units (MAZO_CUDA_MASKED_FAST=0). Triton's bf16 restore and stochastic rounding run in PTX (default, ASM 2), the
    restore only (1) or neither (0)."""
    if variant.startswith("tk."):
        if backend != "triton":
            pytest.skip("a Triton knob")
        from mazo_kernels import triton_kernels as tk
        name, val = variant[3:].split("=")
        monkeypatch.setattr(tk, name, int(val))
    elif variant:
        if backend != "cuda":
            pytest.skip("a CUDA knob")
        monkeypatch.setenv(*variant.split("="))
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), dist, variant)) % 2 ** 31)
    ws, masks = [], []
    for rows, cols, k in ROWIDX_SHAPES:
        ws.append((torch.randn(rows, cols, generator=gen) * 0.02).to(dtype))
        idx = torch.stack([torch.randperm(cols, generator=gen)[:k].sort().values for _ in range(rows)])
        masks.append(mk.RowIndexMask(idx.reshape(rows, k).to(torch.int32).contiguous()))
    ws.append((torch.randn(4100, generator=gen) * 0.02).to(dtype))
    masks.append(None)
    ws.append((torch.randn(9000, generator=gen) * 0.02).to(dtype))
    masks.append(mk.BitMask.from_bool(torch.rand(9000, generator=gen) < 0.5))
    kw = {1: dict(global_offset=8 * 77, full_numel=10 ** 6), 2: dict(global_offset=3, full_numel=10 ** 6),
          3: dict(scale_mult=0.5, lr_mult=2.0, weight_decay=0.1)}

    def plan(device):
        entries = []
        for i, (w, m) in enumerate(zip(ws, masks)):
            if isinstance(m, mk.RowIndexMask):
                m = mk.RowIndexMask(m.cols.to(device))
            elif isinstance(m, mk.BitMask):
                m = mk.BitMask(m.bits.to(device))
            entries.append(mk.PlanEntry(f"w{i}", w.to(device).clone(), 100 + i, mask=m, **kw.get(i, {})))
        return mk.ZOPlan(entries)

    pg, pc = plan("cuda"), plan("cpu")

    def same(what):
        bad = [i for i, (a, c) in enumerate(zip(pg.entries, pc.entries)) if not torch.equal(_bits(a.tensor),
                                                                                              _bits(c.tensor))]
        assert not bad, f"{what}: tensors {bad} differ from the reference ({backend} {variant})"

    seed, eps = 2 ** 64 - 99, 1e-3
    for p, b in ((pg, backend), (pc, "reference")):
        mk.perturb_(p, seed, eps, dist=dist, backend=b)
    same("perturb_, prior 0")
    for p, b in ((pg, backend), (pc, "reference")):
        mk.perturb_(p, seed, -2 * eps, prior=eps, dist=dist, backend=b)
    same("perturb_ with a prior")
    # past the restore's small-shift bound on all but tensor 3 (scale_mult 0.5): CUDA's general restore
    big = 2.0 ** 100 * 1.5 if dtype == torch.bfloat16 else 1.5
    for p, b in ((pg, backend), (pc, "reference")):
        mk.perturb_(p, seed, -2 * eps, prior=big, dist=dist, backend=b)
    same("perturb_ with a large prior")
    for p, b in ((pg, backend), (pc, "reference")):
        mk.update_(p, [seed, 5], [0.4, -0.8], lr=1e-2, restore_seed=seed, prior=-eps, sr_seed=7, dist=dist,
                   backend=b)
    same("update_ with restore")
    for p, b in ((pg, backend), (pc, "reference")):
        mk.perturb_(p, seed, eps, dist=dist, backend=b)
    same("perturb_ again")
    for p, b in ((pg, backend), (pc, "reference")):   # one update seed, the restored one (CUDA: straight-line update)
        mk.update_(p, [seed], [-0.6], lr=1e-2, restore_seed=seed, prior=eps, sr_seed=8, dist=dist, backend=b)
    same("update_ with restore, one seed")
    for p, b in ((pg, backend), (pc, "reference")):   # one update seed, not the restored one
        mk.update_(p, [21], [0.3], lr=1e-2, restore_seed=seed, prior=-eps, sr_seed=2, dist=dist, backend=b)
    same("update_ with restore, another seed")
    for p, b in ((pg, backend), (pc, "reference")):
        mk.update_(p, [13], [0.9], lr=1e-2, sr_seed=3, dist=dist, backend=b)
    same("update_ with prior 0")
    copies = {}
    for p, b in ((pg, backend), (pc, "reference")):
        outs = [torch.full_like(e.tensor, float("nan")) for e in p.entries]
        copies[b] = mk.perturbed_copy(p, seed, 0.3, out=outs, dist=dist, backend=b)
    bad = [i for i, (a, c) in enumerate(zip(copies[backend], copies["reference"])) if not torch.equal(_bits(a),
                                                                                                    _bits(c))]
    assert not bad, f"perturbed_copy: tensors {bad} differ from the reference"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian_fast", "rademacher"])
@pytest.mark.parametrize("same", [True, False], ids=["restored-seed", "other-seed"])
def test_masked_update_with_device_seeds_matches_reference(backend, dtype, dist, same):
    """update_ with a prior and one update seed held in device memory (seed_dev: a captured GraphedZOStep's form)
    over threshold, packed-bit and unmasked tensors: the restored seed (CUDA: the masked kernel's straight-line
    update) or another one (the specialisations' seed loop). Bit for bit against the reference given int seeds.
    The op's int seeds carry other values with the same equality pattern (the op's contract), so the kernels must
    read seed_dev's."""
    from mazo_kernels.api import _seed_bits
    from mazo_kernels.ops import zo_apply_
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), dist, same)) % 2 ** 31)
    sizes = (8 * 4100, 9000, 4099)
    ws = [(torch.randn(n, generator=gen) * 0.02).to(dtype) for n in sizes]
    masks = [mk.ThresholdMask(0.015), mk.BitMask.from_bool(torch.rand(sizes[1], generator=gen) < 0.5), None]

    def plan(device):
        return mk.ZOPlan([mk.PlanEntry(f"w{i}", w.to(device).clone(), 40 + i,
                                       mask=(mk.BitMask(m.bits.to(device)) if isinstance(m, mk.BitMask) else m))
                          for i, (w, m) in enumerate(zip(ws, masks))])

    pg, pc = plan("cuda"), plan("cpu")
    seed, eps = 2 ** 64 - 1234567, 1e-3
    useed = seed if same else 77
    for p, b in ((pg, backend), (pc, "reference")):   # the step's first two passes latch and read the threshold
        mk.perturb_(p, seed, eps, dist=dist, backend=b)
        mk.perturb_(p, seed, -2 * eps, prior=eps, dist=dist, backend=b)
    gs = torch.tensor([0.7])
    d = {"gaussian_fast": ref.DIST_GAUSSIAN_FAST, "rademacher": ref.DIST_RADEMACHER}[dist]
    g = pc.groups[0]
    zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, [_seed_bits(seed), _seed_bits(useed)], gs, ref.OP_UPDATE, d,
              ref.ROUND_STOCHASTIC, 5, ref.THRESH_LATCH_READ, 0.0, -eps, 1e-2, "reference")
    g = pg.groups[0]
    dev = torch.tensor([_seed_bits(seed), _seed_bits(useed), 5], dtype=torch.int64, device="cuda")
    fake = [_seed_bits(seed ^ 0x5555), _seed_bits((useed ^ 0x5555) if not same else (seed ^ 0x5555))]
    zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, fake, gs.cuda(), ref.OP_UPDATE, d, ref.ROUND_STOCHASTIC, 999,
              ref.THRESH_LATCH_READ, 0.0, -eps, 1e-2, backend, dev)
    for i, (a, c) in enumerate(zip(pg.entries, pc.entries)):
        assert torch.equal(_bits(a.tensor).cpu(), _bits(c.tensor)), f"tensor {i} differs ({backend}, same={same})"
    moved = [not torch.equal(_bits(e.tensor), _bits(w)) for e, w in zip(pc.entries, ws)]
    assert all(moved), "every tensor should have moved"


def _cuda_kernel_names(fn):
    """Names of the CUDA kernels fn launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "zo_apply_kernel" in e.name]


def _is_dense_kernel(name):
    """zo_apply_kernel<DT, MIN_BLOCKS, SPEC, F32_XOR, MASKED, DENSE> with DENSE true (csrc/zo_cuda_kernel.cuh)."""
    f, t = r"(?:false|0|\(bool\)0)", r"(?:true|1|\(bool\)1)"
    return re.search(rf"zo_apply_kernel<\s*\d+,\s*\d+,\s*-?\d+,\s*{f},\s*{f},\s*{t}\s*>", name) is not None


@pytest.mark.skipif(not mk.has_cuda(), reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
@pytest.mark.parametrize("variant", ["", "MAZO_CUDA_DENSE=0", "tail"])
def test_cuda_dense_kernels_match_reference(dtype, dist, variant, monkeypatch):
    """Plans whose tensors are all unmasked at 8-aligned offsets (PlanGroup.dense_aligned) run the dense-only CUDA
    kernels where they are kept (16-bit; perturb_ with a prior, and perturb_ / perturbed_copy / update_ with one
    update seed, which with a prior is the restored one, with gaussian_fast or Rademacher noise), every op bit for
    bit against the reference: tensors spanning several blocks, one ending in a
    part block, one at a global offset, one with its own multipliers. MAZO_CUDA_DENSE=0 keeps the kernels with the
    masked and tail paths; "tail" adds a tensor whose length is not a multiple of 8, so the call falls back. The
    profiler's kernel names say which ran."""
    if variant == "MAZO_CUDA_DENSE=0":
        monkeypatch.setenv("MAZO_CUDA_DENSE", "0")
    gen = torch.Generator().manual_seed(hash((str(dtype), dist, variant)) % 2 ** 31)
    sizes = [70000, 3 * 8192, 65544, 8200, 8 * 1001] + ([9003] if variant == "tail" else [])
    w_gpu = _weights(gen, sizes, dtype, "cuda")
    w_cpu = [t.cpu().clone() for t in w_gpu]
    kw = {1: dict(scale_mult=0.5, lr_mult=2.0, weight_decay=0.1), 3: dict(global_offset=8 * 1001, full_numel=10 ** 6)}
    p_gpu, p_cpu = _plan(w_gpu, None, kw), _plan(w_cpu, None, kw)
    assert p_gpu.groups[0].dense_aligned
    dense_on = variant == "" and dtype != torch.float32
    seed, eps = 2 ** 63 + 4321, 1e-3

    def same(what):
        bad = [i for i, (a, c) in enumerate(zip(w_gpu, w_cpu)) if not torch.equal(_bits(a), _bits(c))]
        assert not bad, f"{what}: tensors {bad} differ from the reference ({variant or 'default'})"

    def both(fn, what, dense_kernel):
        names = _cuda_kernel_names(lambda: fn(p_gpu, "cuda"))
        fn(p_cpu, "reference")
        same(what)
        assert names, what
        assert all(_is_dense_kernel(n) == (dense_on and dense_kernel) for n in names), (what, names)

    light = dist != "gaussian"
    both(lambda p, b: mk.perturb_(p, seed, eps, dist=dist, backend=b), "perturb_, prior 0", light)
    both(lambda p, b: mk.perturb_(p, seed, -2 * eps, prior=eps, dist=dist, backend=b), "perturb_ with a prior", True)
    # a shift past the restore's small-shift bound (|prior * scale_mult| >= 2^100 bf16, >= 1 fp16; tensor 1 has
    # scale_mult 0.5, so it and the others take different restores in one launch): the general restore, out of line
    big = 2.0 ** 100 * 1.5 if dtype == torch.bfloat16 else 1.5
    both(lambda p, b: mk.perturb_(p, seed, eps, prior=big, dist=dist, backend=b), "perturb_ with a large prior", True)
    both(lambda p, b: mk.update_(p, [seed], [0.4], lr=1e-2, restore_seed=seed, prior=big, rounding="stochastic",
                                 sr_seed=6, dist=dist, backend=b), "update_ with a large prior", light)
    for rounding in ("stochastic", "nearest"):
        # one update seed, the restored one (the ZO step's update_), its gradient on the device or given as a float
        both(lambda p, b: mk.update_(p, [seed], torch.tensor([0.7], device="cuda") if b == "cuda" else [0.7],
                                     lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding, sr_seed=9, dist=dist,
                                     backend=b), f"update_ with restore, one seed, {rounding}", light)
        both(lambda p, b: mk.update_(p, [13], [-1.1], lr=1e-2, rounding=rounding, sr_seed=3, dist=dist, backend=b),
             f"update_ with prior 0, one seed, {rounding}", light)
        # several update seeds, or one that is not the restored one: the kernels with the update loop
        both(lambda p, b: mk.update_(p, [seed, 7], torch.tensor([0.7, -1.3], device="cuda") if b == "cuda"
                                     else [0.7, -1.3], lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding,
                                     sr_seed=9, dist=dist, backend=b), f"update_ with restore, {rounding}", False)
        both(lambda p, b: mk.update_(p, [7], [0.9], lr=1e-2, restore_seed=seed, prior=eps, rounding=rounding,
                                     sr_seed=4, dist=dist, backend=b), f"update_ with restore, other seed, {rounding}",
             False)
        both(lambda p, b: mk.update_(p, [11, 12], [0.2, -0.4], lr=1e-2, rounding=rounding, sr_seed=5, dist=dist,
                                     backend=b), f"update_ with prior 0, {rounding}", False)
    for rounding in ("stochastic", "nearest"):
        # op 3 (ZOSGD lookahead's pass: update_ then the next +eps): one dense-only launch where those kernels fuse
        # it (16-bit, gaussian_fast / Rademacher), else the two ops' launches
        def op3(p, b):
            mk.update_(p, [seed], [0.7], lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding, sr_seed=9,
                       dist=dist, backend=b, next_seed=seed ^ 0xF0F0, next_scale=eps)
            mk.perturb_(p, seed ^ 0xF0F0, -eps, prior=eps, dist=dist, backend=b)   # back to -eps z(seed)
        names = _cuda_kernel_names(lambda: op3(p_gpu, "cuda"))
        op3(p_cpu, "reference")
        same(f"update_ then perturb (op 3), {rounding}")
        fused = dense_on and light
        assert len(names) == (2 if fused else 3), (rounding, names)
        assert _is_dense_kernel(names[0]) == fused, names
    copies = {}
    for plan, b in ((p_gpu, "cuda"), (p_cpu, "reference")):
        outs = [torch.full_like(e.tensor, float("nan")) for e in plan.entries]
        if b == "cuda":
            names = _cuda_kernel_names(lambda: mk.perturbed_copy(plan, seed, 0.3, out=outs, dist=dist, backend=b))
            assert names and all(_is_dense_kernel(n) == (dense_on and light) for n in names), names
            outs = [o.fill_(float("nan")) for o in outs]
        copies[b] = mk.perturbed_copy(plan, seed, 0.3, out=outs, dist=dist, backend=b)
    bad = [i for i, (a, c) in enumerate(zip(copies["cuda"], copies["reference"])) if not torch.equal(_bits(a), _bits(c))]
    assert not bad, f"perturbed_copy: tensors {bad} differ from the reference"


@pytest.mark.skipif(not mk.has_cuda(), reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
def test_cuda_dense_kernels_take_device_seeds(dtype, dist):
    """The ZO step's update_ (restore, one update seed: the restored one) and op 3 (that update and the next +eps
    pass, a captured lookahead step's last pass) with their seeds in device memory (seed_dev) on a dense-aligned
    plan: the dense-only kernels run them where they are kept (16-bit, gaussian_fast / Rademacher; op 3 one fused
    launch), bit for bit the reference given the int seeds. The op's int arguments carry other seeds with the same
    equality pattern, so the kernels must read seed_dev's."""
    from mazo_kernels.api import _seed_bits
    from mazo_kernels.ops import zo_apply_
    gen = torch.Generator().manual_seed(hash((str(dtype), dist, "seed_dev")) % 2 ** 31)
    w_gpu = _weights(gen, [70000, 3 * 8192, 8 * 1001], dtype, "cuda")
    w_cpu = [t.cpu().clone() for t in w_gpu]
    p_gpu, p_cpu = _plan(w_gpu), _plan(w_cpu)
    assert p_gpu.groups[0].dense_aligned
    dense = dtype != torch.float32 and dist != "gaussian"
    d = {"gaussian": ref.DIST_GAUSSIAN, "gaussian_fast": ref.DIST_GAUSSIAN_FAST, "rademacher": ref.DIST_RADEMACHER}[dist]
    seed, nxt, eps, sr = 2 ** 63 + 99, 2 ** 40 + 7, 1e-3, 2 ** 62 + 5
    for op, tail, what in ((ref.OP_UPDATE, [], "update_"), (ref.OP_UPDATE_PERTURB, [nxt], "op 3")):
        for p, b in ((p_gpu, "cuda"), (p_cpu, "reference")):   # a step's two passes, then its last
            mk.perturb_(p, seed, eps, dist=dist, backend=b)
            mk.perturb_(p, seed, -2 * eps, prior=eps, dist=dist, backend=b)
        seeds = [_seed_bits(seed), _seed_bits(seed)] + [_seed_bits(t) for t in tail]
        gs = torch.tensor([0.7])
        g = p_cpu.groups[0]
        zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, seeds, gs, op, d, ref.ROUND_STOCHASTIC, _seed_bits(sr),
                  ref.THRESH_LATCH_READ, eps if tail else 0.0, -eps, 1e-2, "reference", dense_aligned=True)
        g = p_gpu.groups[0]
        dev = torch.tensor(seeds + [_seed_bits(sr)], dtype=torch.int64, device="cuda")
        fake = [_seed_bits(seed ^ 0x5555)] * 2 + [_seed_bits(t ^ 0x3333) for t in tail]

        def call():
            zo_apply_(g.tensors, [], g.masks, g.meta, g.fvals, fake, gs.cuda(), op, d, ref.ROUND_STOCHASTIC, 77,
                      ref.THRESH_LATCH_READ, eps if tail else 0.0, -eps, 1e-2, "cuda", dev, dense_aligned=True)
        names = _cuda_kernel_names(call)
        bad = [i for i, (a, c) in enumerate(zip(w_gpu, w_cpu)) if not torch.equal(_bits(a).cpu(), _bits(c))]
        assert not bad, f"{what}: tensors {bad} differ from the reference"
        assert names and all(_is_dense_kernel(n) == dense for n in names), (what, names)
        if tail:
            assert len(names) == (1 if dense else 2), names
    for p, b in ((p_gpu, "cuda"), (p_cpu, "reference")):   # and that carry is the reference's
        mk.perturb_(p, nxt, -2 * eps, prior=eps, dist=dist, backend=b)
    bad = [i for i, (a, c) in enumerate(zip(w_gpu, w_cpu)) if not torch.equal(_bits(a).cpu(), _bits(c))]
    assert not bad, f"after op 3: tensors {bad} differ from the reference"


_BROKEN_PROMISE = """
import torch, mazo_kernels as mk
from mazo_kernels import reference as ref
w = (torch.randn(4096) * 0.02).to(torch.bfloat16).cuda()
plan = mk.ZOPlan([mk.PlanEntry("w", w, 1)])
g = plan.groups[0]
meta = g.meta.clone()
mk.ops.zo_apply_(g.tensors, [], g.masks, meta, g.fvals, [5], torch.zeros(0, device="cuda"), ref.OP_PERTURB,
                 ref.DIST_GAUSSIAN_FAST, ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, 1e-3, 0.0, 0.0, "cuda",
                 dense_aligned=True)
torch.cuda.synchronize()
print("promise kept: ok", flush=True)
meta[0, 2] = ref.MASK_THRESHOLD   # a threshold evaluated in the kernel, no latch: only the device table says so
mk.ops.zo_apply_(g.tensors, [], g.masks, meta, g.fvals, [5], torch.zeros(0, device="cuda"), ref.OP_PERTURB,
                 ref.DIST_GAUSSIAN_FAST, ref.ROUND_NEAREST, 0, ref.THRESH_EVAL, 1e-3, 0.0, 0.0, "cuda",
                 dense_aligned=True)
torch.cuda.synchronize()
print("promise broken: not caught", flush=True)
"""


@pytest.mark.skipif(not mk.has_cuda(), reason="needs the CUDA extension")
def test_cuda_dense_kernel_traps_a_broken_promise():
    """dense_aligned=True over a table whose mask kind (on the device only) is not none: the dense-only kernel stops
    with a device-side trap instead of writing the tensor unmasked. A trap ends the CUDA context: a subprocess."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _BROKEN_PROMISE], capture_output=True, text=True, timeout=300)
    assert "promise kept: ok" in r.stdout, r.stderr[-2000:]
    assert "not caught" not in r.stdout
    assert r.returncode != 0 and "CUDA" in r.stderr, r.stderr[-2000:]


def _special_weights(gen, n, dtype):
    """N(0, 0.02^2) weights with inf, NaN of either sign, signed zeros, subnormals and the largest finite values of the
    dtype sprinkled in (every 37th element, from the second)."""
    fin = torch.finfo(dtype)
    vals = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 0.0, -0.0, fin.max, -fin.max,
                         fin.smallest_normal / 4, -fin.smallest_normal, 1.0, fin.tiny * 2], dtype=torch.float32)
    vals = vals.to(dtype)   # the extremes exactly representable in dtype (a NaN keeps its sign bit in the cast)
    w = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    idx = torch.arange(1, n, 37)
    w[idx] = vals[torch.randint(0, vals.numel(), (idx.numel(),), generator=gen)]
    return w


def _same_as_spec(a, c, what):
    """The spec's contract for special values (docs/NOISE_SPEC.md section 4): every non-NaN result bit for bit, a NaN
    where the reference has one, and for bf16 the NaN's bits too (0x7FC0); fp16 and fp32 NaN bits are the platform's."""
    a, c = a.detach().cpu(), c.detach().cpu()
    na, nc = torch.isnan(a.float()), torch.isnan(c.float())
    assert torch.equal(na, nc), f"{what}: NaN positions differ ({int((na != nc).sum())} elements)"
    assert torch.equal(_bits(a)[~na], _bits(c)[~nc]), f"{what}: non-NaN results differ"
    if a.dtype == torch.bfloat16:
        assert bool((_bits(a)[na] == 0x7FC0).all()), f"{what}: a bf16 NaN that is not 0x7FC0"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian_fast", "rademacher"])
@pytest.mark.parametrize("sizes", [(8 * 4100, 8 * 37, 8192), (4099, 1000, 129)], ids=["aligned", "odd"])
def test_special_values_match_reference(backend, dtype, dist, sizes):
    """Weights holding inf, NaN of either sign, zeros, subnormals and the largest finite values through every op and
    both roundings, against the reference: the aligned plan runs the dense / fast paths (CUDA's packed roundings and
    restores), the odd one the tails. Weight decay turns the infinities into NaNs (inf - inf) in update_."""
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), dist, sizes)) % 2 ** 31)
    w_gpu = [_special_weights(gen, n, dtype).cuda() for n in sizes]
    w_cpu = [t.cpu().clone() for t in w_gpu]
    kw = {1: dict(scale_mult=0.5, lr_mult=2.0, weight_decay=0.1)}
    p_gpu, p_cpu = _plan(w_gpu, None, kw), _plan(w_cpu, None, kw)
    seed, eps = 2 ** 61 + 77, 1e-3

    def step(what, fn):
        fn(p_gpu, backend)
        fn(p_cpu, "reference")
        for i, (a, c) in enumerate(zip(w_gpu, w_cpu)):
            _same_as_spec(a, c, f"{what}, tensor {i}")

    step("perturb_", lambda p, b: mk.perturb_(p, seed, eps, dist=dist, backend=b))
    step("perturb_ with a prior", lambda p, b: mk.perturb_(p, seed, -2 * eps, prior=eps, dist=dist, backend=b))
    for rounding in ("stochastic", "nearest"):
        step(f"update_ with restore, {rounding}",
             lambda p, b: mk.update_(p, [seed, 5], torch.tensor([0.7, -1.3], device="cuda") if b != "reference"
                                     else [0.7, -1.3], lr=1e-2, restore_seed=seed, prior=-eps, rounding=rounding,
                                     sr_seed=3, dist=dist, backend=b))
        step(f"update_ with prior 0, {rounding}",
             lambda p, b: mk.update_(p, [9], [0.3], lr=1e-2, rounding=rounding, sr_seed=4, dist=dist, backend=b))
    outs = {}
    for plan, b in ((p_gpu, backend), (p_cpu, "reference")):
        o = [torch.full_like(e.tensor, 1.5) for e in plan.entries]     # poisoned with a value the copy never makes
        outs[b] = mk.perturbed_copy(plan, seed, 0.3, out=o, dist=dist, backend=b)
    for i, (a, c) in enumerate(zip(outs[backend], outs["reference"])):
        _same_as_spec(a, c, f"perturbed_copy, tensor {i}")
    assert any(torch.isnan(t.float()).any() for t in w_cpu), "the case holds no NaN: it tests nothing"
