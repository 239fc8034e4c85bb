"""Known answers that freeze noise spec v2 (v1 plus gaussian_fast): Philox4x32-10 (Random123's published vectors) and a committed table of z
values (python_tests/data/z_table.json, written once by make_z_table.py). Every available backend must reproduce the
table bit for bit through the public noise()."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import mazo_kernels
from mazo_kernels import reference as ref

DIST_CODES = {"gaussian": ref.DIST_GAUSSIAN, "rademacher": ref.DIST_RADEMACHER, "gaussian_fast": ref.DIST_GAUSSIAN_FAST}
TABLE_PATH = os.path.join(os.path.dirname(__file__), "data", "z_table.json")

# Random123 kat_vectors: philox4x32_10 (counter, key) -> output
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _load_table():
    with open(TABLE_PATH) as f:
        return json.load(f)


def _bits(x: torch.Tensor) -> list[str]:
    b = x.detach().cpu().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return [f"{int(v):08x}" for v in b]


def available_backends():
    """(backend, device) pairs that can run here; missing ones are reported as skips, not silently dropped."""
    cuda = torch.cuda.is_available()
    out = [pytest.param("reference", "cpu", id="reference")]
    out.append(pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(
        not mazo_kernels.has_cpu(), reason="C++ extension mazo_kernels._C not built")))
    triton_ok = (mazo_kernels.has_triton() and importlib.util.find_spec("mazo_kernels.triton_kernels") is not None
                 and (os.environ.get("TRITON_INTERPRET") == "1" or cuda))
    out.append(pytest.param("triton", "cuda" if cuda else "cpu", id="triton", marks=pytest.mark.skipif(
        not triton_ok, reason="triton backend needs a GPU or TRITON_INTERPRET=1")))
    out.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(
        not (cuda and mazo_kernels.has_cuda()), reason="needs a GPU and the CUDA extension")))
    return out


def test_spec_version():
    assert ref.SPEC_VERSION == 2
    assert mazo_kernels.SPEC_VERSION == 2
    assert ref.REPLAYABLE_SPEC_VERSIONS == (1, 2)   # v2 only added gaussian_fast; every v1 value is unchanged
    assert _load_table()["spec_version"] == ref.SPEC_VERSION


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    out = ref.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], key[0], key[1])
    assert tuple(int(w[0]) for w in out) == expected


def test_philox_vectorised_matches_scalar():
    # the same call, batched with other counters, gives the same words (no cross-lane mixing)
    ctrs = [c for c, _, _ in PHILOX_KAT]
    cols = [torch.tensor([c[j] for c in ctrs], dtype=torch.int64) for j in range(4)]
    for k, (_, key, expected) in enumerate(PHILOX_KAT):
        out = ref.philox4x32_10(*cols, key[0], key[1])
        assert tuple(int(w[k]) for w in out) == expected


def test_table_covers_the_documented_grid():
    rows = _load_table()["rows"]
    combos = {(r["dist"], int(r["seed"]), r["tensor_id"]) for r in rows}
    assert len(combos) == len(rows) == 3 * 4 * 3
    assert {r["dist"] for r in rows} == {"gaussian", "rademacher", "gaussian_fast"}
    for r in rows:
        assert [int(i) for i in r["indices"]] == list(range(8)) + [2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3]
        assert len(r["f32_bits"]) == len(r["indices"])


def test_reference_reproduces_z_table():
    for r in _load_table()["rows"]:
        dist = DIST_CODES[r["dist"]]
        idx = torch.tensor([int(i) for i in r["indices"]], dtype=torch.int64)
        got = _bits(ref.noise(int(r["seed"]), r["tensor_id"], idx, dist))
        assert got == r["f32_bits"], (r["dist"], r["seed"], r["tensor_id"])


def test_reference_is_pure_function_of_index():
    # z[i] does not depend on which other indices are computed with it, nor on their order
    seed, tid = 2 ** 63 + 12345, 99
    idx = torch.arange(1000, 1200)
    full = ref.gaussian(seed, tid, idx)
    perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ref.gaussian(seed, tid, idx[perm]), full[perm])
    assert torch.equal(ref.gaussian(seed, tid, idx[5:6]), full[5:6])


@pytest.mark.parametrize("backend,device", available_backends())
def test_api_noise_reproduces_z_table(backend, device):
    for r in _load_table()["rows"]:
        seed, tid = int(r["seed"]), r["tensor_id"]
        got = []
        # three ranges: 0..7, [2**32-1, 2**32], 2**40+3 (offset = global index of the first element)
        for off, n in ((0, 8), (2 ** 32 - 1, 2), (2 ** 40 + 3, 1)):
            z = mazo_kernels.noise(seed, tid, off, n, dist=r["dist"], device=device, backend=backend)
            assert z.dtype == torch.float32 and z.shape == (n,) and z.device.type == device
            got += _bits(z)
        assert got == r["f32_bits"], (backend, r["dist"], r["seed"], r["tensor_id"])


@pytest.mark.parametrize("backend,device", available_backends())
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "gaussian_fast"])
def test_api_noise_matches_reference_on_a_range(backend, device, dist):
    # an unaligned range (offset not a multiple of 4 or 128) of a few thousand values
    seed, tid, off, n = 0xDEADBEEFCAFEF00D, 12345, 1_000_003, 3001
    z = mazo_kernels.noise(seed, tid, off, n, dist=dist, device=device, backend=backend)
    expect = ref.noise(seed, tid, torch.arange(off, off + n), DIST_CODES[dist])
    assert torch.equal(z.cpu().view(torch.int32), expect.view(torch.int32))
