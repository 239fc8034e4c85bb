"""The CUDA restoring kernels leave out the restore's finite test where |prior x scale_mult| is small (invert8's
SMALL_SHIFT, csrc/zo_cuda_kernel.cuh): |d| < 2^103 in bf16, |d| < 8 in fp16 (|z| <= 5.27). The kernel's claim is
that the test cannot change a result there. This checks it for every 16-bit stored pattern (NaNs and infinities
included) against many shifts, with the device's arithmetic emulated in numpy: float32 add / subtract round to
nearest even and return the canonical NaN 0x7FFFFFFF; cvt.rn.bf16x2 / cvt.rn.f16x2 round to nearest even and give
0x7FFF for a NaN; cvt.f32.f16 is exact (a NaN stays some NaN). Where the two forms differ, both bases must be NaN
(the op then rounds a NaN either way: the hardware's NaN for fp16, the spec's 0x7FC0 for bf16)."""
import numpy as np
import pytest

F32_NAN = np.uint32(0x7FFFFFFF)


def _f(bits):
    return bits.astype(np.uint32).view(np.float32)


def _b(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def _arith(x):
    """A float32 result as the GPU returns it: a NaN is the canonical 0x7FFFFFFF."""
    b = _b(x).copy()
    b[np.isnan(x)] = F32_NAN
    return _f(b)


def _cvt_bf16(x):
    """cvt.rn.bf16.f32: nearest even, a NaN becomes 0x7FFF (16-bit pattern, uint32)."""
    b = _b(x).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32) & 0xFFFF
    r[np.isnan(x)] = 0x7FFF
    return r


def _cvt_f16(x):
    """cvt.rn.f16.f32: nearest even (numpy's float16 cast rounds so), a NaN becomes 0x7FFF."""
    with np.errstate(over="ignore"):
        r = np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    r[np.isnan(x)] = 0x7FFF
    return r


def _f16_to_f32(h):
    return h.astype(np.uint16).view(np.float16).astype(np.float32)


def _choose(w_bits, d, y, c0, c1, cvt, finite, even1, small):
    """invert8's choice between the two candidate bases (the same for both storage types): c1 where it rounds back to
    the stored bits and c0 does not, or both do and c1's pattern is even; never where y == c0; and, unless small,
    only where c0 is finite."""
    with np.errstate(all="ignore"):
        ok0 = cvt(_arith(c0 + d)) == w_bits
        ok1 = cvt(_arith(c1 + d)) == w_bits
    take1 = (y != c0) & ok1 & (~ok0 | even1)
    if not small:
        take1 &= finite
    return np.where(take1, c1, c0)


def _restore_bf16(w_bits, d, small):
    """invert8 for bf16 (the packed form's per-half operations), bases as float32."""
    x = _f(w_bits << 16)
    with np.errstate(all="ignore"):
        y = _arith(x - d)
        yb = _b(y)
        c0b = _cvt_bf16(y) << 16
        c1b = (2 * (yb & 0xFFFF0000).astype(np.uint64) + 0x10000 - c0b).astype(np.uint64) & 0xFFFFFFFF
        c1b = c1b.astype(np.uint32)
        c0, c1 = _f(c0b), _f(c1b)
    return _choose(w_bits, d, y, c0, c1, _cvt_bf16, (~c0b & 0x7F800000) != 0, (c1b & 0x10000) == 0, small)


def _restore_f16(w_bits, d, small):
    """invert8 for fp16 with the hardware conversions, bases as float32."""
    x = _f16_to_f32(w_bits)
    with np.errstate(all="ignore"):
        y = _arith(x - d)
        b0 = _cvt_f16(y)
        c0 = _f16_to_f32(b0)
        b1 = np.where(_b(y) > _b(c0), b0 + 1, b0 - 1).astype(np.uint32) & 0xFFFF
        c1 = _f16_to_f32(b1)
    return _choose(w_bits, d, y, c0, c1, _cvt_f16, (_b(c0) & 0x7F800000) != 0x7F800000, (b1 & 1) == 0, small)


def _shifts(bound, n, seed):
    """Shifts below the bound: log-uniform magnitudes over the whole float32 range below it, both signs, and the
    edges (0, the smallest subnormal, the largest float32 below the bound)."""
    rng = np.random.default_rng(seed)
    mags = np.exp2(rng.uniform(-149, np.log2(bound), n)).astype(np.float32)
    mags = mags[mags < bound]
    top = np.nextafter(np.float32(bound), np.float32(0))
    edge = np.array([0.0, 1e-45, 2.0 ** -126, 1e-3, 0.5, 1.0, top], dtype=np.float32)
    m = np.concatenate([mags, edge])
    return np.concatenate([m, -m])


@pytest.mark.parametrize("dtype,bound", [("bf16", 2.0 ** 103), ("fp16", 8.0)])
def test_the_finite_test_cannot_change_a_small_shift_restore(dtype, bound):
    w = np.arange(65536, dtype=np.uint32)       # every stored pattern
    restore = _restore_bf16 if dtype == "bf16" else _restore_f16
    checked = differ = 0
    for d in _shifts(bound, 400, seed=1 if dtype == "bf16" else 2):
        full = restore(w, np.float32(d), small=False)
        small = restore(w, np.float32(d), small=True)
        same = (_b(full) == _b(small)) | (np.isnan(full) & np.isnan(small))
        assert same.all(), (f"{dtype}, d = {float(d)!r}: the restore without its finite test differs at stored "
                            f"patterns {[hex(int(v)) for v in w[~same][:8]]}")
        checked += w.size
        differ += int((_b(full) != _b(small)).sum())
    assert checked >= 65536 * 800
    # not vacuous: far past the bound the finite test does change a result. The stored w = 2^127 + 2^121 (bf16) /
    # 32832 (fp16), even, and d such that y = w - d is the largest finite value plus half an ulp: c0 = inf (the tie
    # goes to the even pattern), c1 = the largest finite value, and c1 + d = w minus half of w's ulp rounds to w.
    big = np.float32(-(2.0 ** 127 - 2.0 ** 121 - 2.0 ** 119) if dtype == "bf16" else -32688.0)
    full, small = restore(w, big, small=False), restore(w, big, small=True)
    assert ((_b(full) != _b(small)) & ~(np.isnan(full) & np.isnan(small))).any()
