"""EMA op (ema_update_): native kernels vs the upstream formula / the reference;
the three-way contract; the CUDA body walked over its grid on the CPU; a
property-based differential suite; the update_ema drop-in's findings; CUDA
launch paths (marked `cuda`: skipped without a GPU)."""

import dataclasses
import math
import os
from typing import Optional

import pytest
import torch
from contract import WAYS, Contract, assert_three_way, faked, raises, raw, with_backend
from helpers import (
    DEVICES,
    FLOATS,
    PAIRS,
    assert_bitwise_equal,
    assert_ema_matches_reference,
    bits,
    each_isa,
    free_cuda_bytes,
    inference_zeros,
    needs_native,
    rand,
    shard_sizes,
    skip_without_native,
    with_specials,
    z,
)
from hypothesis import event, given
from hypothesis import strategies as st

import opensora_fast
from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE

# Only a declared pure-Python install skips; a build that silently failed must fail here.
pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
OP = torch.ops.opensora_fast
SIZES = [0, 1, 3, 4099, 2**20 + 3]
DECAYS = [0.9999, 0.99, 0.5, 0.0, 1.0]


def upstream(ema, src, decay):
    for e, s in zip(ema, src):
        e.mul_(decay).add_(s, alpha=1 - decay)


def assert_matches_upstream(got, want, msg=""):
    """Bitwise, with one documented exception. When ema and src share a reduced
    dtype (bf16/bf16, fp16/fp16), torch's CPU add computes its vectorised body
    as R(fma(src, R(alpha), e1)) -- the rule we follow for every element -- but
    the scalar remainder of each of its thread chunks (fewer than two vectors,
    i.e. < 64 elements even with AVX-512) as R(e1 + R(R(alpha) * src)). Those
    few elements may differ by 1 ulp; which ones depends on torch's threads and
    CPU vector width, not on the data."""
    if not (msg.startswith("bf16/bf16") or msg.startswith("fp16/fp16")):
        return assert_bitwise_equal(got, want, msg)
    diff = got.float() != want.float()
    assert int(diff.sum()) <= 64 * max(torch.get_num_threads(), 1), msg
    ulp = torch.finfo(got.dtype).eps * want.float().abs().clamp_min(torch.finfo(got.dtype).tiny)
    assert bool(((got.float() - want.float()).abs() <= ulp)[diff].all()), msg


def tag(edt, sdt):
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"{name[edt]}/{name[sdt]}"


@pytest.mark.parametrize("edt,sdt", PAIRS)
@pytest.mark.parametrize("n", SIZES)
def test_compat_bit_exact_vs_upstream(edt, sdt, n):
    g = torch.Generator().manual_seed(n * 31 + FLOATS.index(edt) * 3 + FLOATS.index(sdt))
    e0, s = rand(n, edt, g), rand(n, sdt, g, scale=3.0)
    for decay in DECAYS if n < 5000 else [0.9999, 0.9]:
        want, got = e0.clone(), e0.clone()
        upstream([want], [s], decay)
        torch.ops.opensora_fast.ema_update_([got], [s], decay)
        assert_matches_upstream(got, want, f"{tag(edt, sdt)} n={n} decay={decay}")


@pytest.mark.parametrize("limits", [(0, 0), (5, 7)], ids=["cuda-limits", "tiny-tables"])
@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_grid_walk_matches_upstream(edt, sdt, limits):
    # The CUDA kernel's per-thread body over its whole launch grid, on the CPU:
    # tails, misaligned views (offset 1), tables split by tensor count and by
    # block count, mid-tensor (tiny limits: 5 tensors / 7 blocks per launch).
    g = torch.Generator().manual_seed(7)
    sizes = [1, 3, 4099, 32768, 32769, 20 * 32768 + 5] + [64] * 300
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    big = rand(5000, edt, g)
    ema.append(big[1:])  # storage offset 1: not 16-byte aligned
    src.append(rand(5000, sdt, g)[1:])  # misaligned on the source side too
    want = [e.clone() for e in ema]
    upstream(want, src, 0.999)
    torch.ops.opensora_fast._ema_update_grid_walk_(ema, src, 0.999, False, 0, *limits)
    for i, (a, b) in enumerate(zip(ema, want)):
        assert_matches_upstream(a, b, f"{tag(edt, sdt)} pair {i}")
    # stochastic rounding is independent of the launch geometry
    seeded = [e.clone() for e in want]
    walked = [e.clone() for e in want]
    torch.ops.opensora_fast.ema_update_(seeded, src, 0.9999, True, 99)
    torch.ops.opensora_fast._ema_update_grid_walk_(walked, src, 0.9999, True, 99, *limits)
    for i, (a, b) in enumerate(zip(walked, seeded)):
        assert_bitwise_equal(a, b, f"stochastic pair {i}")


def test_1082_tensor_shard_list_mixed_dtypes():
    g = torch.Generator().manual_seed(1)
    sizes = shard_sizes(4096)
    assert len(sizes) == 1082
    ema = [rand(n, FLOATS[i % 3], g) for i, n in enumerate(sizes)]
    src = [rand(n, FLOATS[(i // 3) % 3], g) for i, n in enumerate(sizes)]
    want = [e.clone() for e in ema]
    upstream(want, src, 0.9999)
    ops.ema_update_(ema, src, 0.9999)
    for i, (a, b, s) in enumerate(zip(ema, want, src)):
        assert_matches_upstream(a, b, f"{tag(a.dtype, s.dtype)} pair {i}")


@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_stochastic_native_equals_reference(edt, sdt):
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 3, 4099, 70001]
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    ref = [e.clone() for e in ema]
    torch.ops.opensora_fast.ema_update_(ema, src, 0.9999, True, 12345)
    reference.ema.ema_update_(ref, src, 0.9999, True, 12345)
    for i, (a, b) in enumerate(zip(ema, ref)):
        assert_bitwise_equal(a, b, f"pair {i}")


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    # Each result is one of the two bf16 neighbours of the exact fp32 value, and
    # the mean over many draws is the fp32 value.
    n = 200_000
    e = torch.full((n,), 1.0, dtype=torch.bfloat16)
    s = torch.full((n,), 1.5, dtype=torch.float32)
    exact = 1.0 * 0.99 + 1.5 * 0.01  # 1.005, between bf16 1.0 and 1.0078125
    ops.ema_update_([e], [s], 0.99, stochastic=True, seed=5)
    vals = set(e.float().unique().tolist())
    assert vals <= {1.0, 1.0078125} and len(vals) == 2
    assert abs(e.float().mean().item() - exact) < 2e-4


def test_stochastic_seed_reproducible_and_generator_draws():
    x = torch.randn(10000).bfloat16()
    s = torch.randn(10000)
    a, b, c = x.clone(), x.clone(), x.clone()
    ops.ema_update_([a], [s], 0.999, stochastic=True, seed=1)
    ops.ema_update_([b], [s], 0.999, stochastic=True, seed=1)
    ops.ema_update_([c], [s], 0.999, stochastic=True, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    d, e = x.clone(), x.clone()
    ops.ema_update_([d], [s], 0.999, stochastic=True, generator=g1)
    ops.ema_update_([e], [s], 0.999, stochastic=True, generator=g2)
    assert torch.equal(d, e)


def test_stochastic_bf16_ema_tracks_fp32_where_compat_stalls():
    # decay 0.9999: the per-step increment (~1e-4) is far below half a bf16 ulp
    # at 1.0 (0.0039), so round-to-nearest never moves; stochastic rounding does.
    g = torch.Generator().manual_seed(0)
    n, steps, decay = 4096, 3000, 0.9999
    start = (1.0 + 0.5 * torch.rand(n, generator=g)).bfloat16()
    target = start.float() + 1.0
    fp32, compat, sr = start.float(), start.clone(), start.clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ops.ema_update_([fp32, compat, sr], [target] * 3, decay)  # fp32 EMA and compat
        sr_prev = sr  # (same list call cannot mix modes)
        ops.ema_update_([sr_prev], [target], decay, stochastic=True, generator=gen)
    moved = (fp32 - start.float()).mean().item()
    assert moved > 0.2  # 1 - 0.9999**3000 = 0.259
    assert torch.equal(compat, start)  # stalled: not one element changed
    err = (sr.float() - fp32).mean().abs().item()
    assert err < 0.02 * moved, (err, moved)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    ema = [rand(n, torch.bfloat16, g) for n in (5, 1000)]
    src = [rand(n, torch.float32, g) for n in (5, 1000)]
    torch.library.opcheck(torch.ops.opensora_fast.ema_update_.default, (ema, src, 0.99, False, 0))
    torch.library.opcheck(torch.ops.opensora_fast.ema_update_.default, (ema, src, 0.99, True, 3))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    ema = [rand(n, torch.bfloat16, g) for n in (17, 4099)]
    src = [rand(n, torch.float32, g) for n in (17, 4099)]
    want = [e.clone() for e in ema]
    upstream(want, src, 0.999)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ema, src):
        ops.ema_update_(ema, src, 0.999)

    step(ema, src)
    for a, b in zip(ema, want):
        assert_bitwise_equal(a, b)


def test_empty_inputs_are_fine():
    ops.ema_update_([], [], 0.9)
    e = torch.empty(0, dtype=torch.bfloat16)
    ops.ema_update_([e], [torch.empty(0)], 0.9)
    torch.ops.opensora_fast.ema_update_([e], [torch.empty(0)], 0.9)


def _bad_cases():
    f = lambda n, dt=torch.float32: torch.zeros(n, dtype=dt)  # noqa: E731
    return [
        ("len", [f(3)], [f(3), f(3)], 0.9, ValueError, "len(ema)=1"),
        ("numel", [f(3), f(4)], [f(3), f(5)], 0.9, ValueError, "ema[1] has shape [4] but src[1] has shape [5]"),
        ("shape", [f(3), torch.zeros(2, 3)], [f(3), f(6)], 0.9, ValueError, "ema[1] has shape [2, 3]"),
        ("int ema", [f(3), f(3, torch.int32)], [f(3), f(3)], 0.9, TypeError, "ema[1] has dtype"),
        ("int src", [f(3), f(3)], [f(3), f(3, torch.int64)], 0.9, TypeError, "src[1] has dtype"),
        ("ema strided", [f(3), torch.zeros(3, 2)[:, 0]], [f(3), f(3)], 0.9, ValueError, "ema[1] is not contiguous"),
        ("src strided", [f(3), f(3)], [f(3), torch.zeros(3, 2)[:, 0]], 0.9, ValueError, "src[1] is not contiguous"),
        ("decay>1", [f(3)], [f(3)], 1.5, ValueError, "decay must be in [0, 1]"),
        ("decay<0", [f(3)], [f(3)], -0.1, ValueError, "decay must be in [0, 1]"),
        ("decay nan", [f(3)], [f(3)], math.nan, ValueError, "decay must be in [0, 1]"),
        ("meta device", [f(3), f(3)], [f(3), torch.zeros(3, device="meta")], 0.9, ValueError, "src[1] is on meta"),
    ]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_and_writes_nothing(case, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    _, ema, src, decay, exc, text = case
    ema[0].fill_(1.0)
    src[0].fill_(2.0)
    with pytest.raises(exc) as info:
        ops.ema_update_(ema, src, decay)
    assert text in str(info.value)
    assert torch.all(ema[0] == 1.0), "the valid pair before the bad one was written"


def test_bad_input_direct_op_call_is_a_python_exception():
    with pytest.raises(ValueError, match=r"ema\[0\] has shape"):
        torch.ops.opensora_fast.ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(TypeError, match=r"ema\[0\] has dtype"):
        torch.ops.opensora_fast.ema_update_([torch.zeros(3, dtype=torch.int8)], [torch.zeros(3)], 0.9)


def test_backend_reference_forced_matches_native(monkeypatch, caplog):
    g = torch.Generator().manual_seed(2)
    ema = [rand(n, torch.bfloat16, g) for n in (3, 4099)]
    src = [rand(n, torch.float32, g) for n in (3, 4099)]
    a = [e.clone() for e in ema]
    ops.ema_update_(a, src, 0.9)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    monkeypatch.setattr(opensora_fast._ext, "_told", set())  # as in a fresh process
    b = [e.clone() for e in ema]
    with caplog.at_level("WARNING", logger="opensora_fast"):
        ops.ema_update_(b, src, 0.9)
        ops.ema_update_([e.clone() for e in ema], src, 0.9)
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)
    # said once, not per call
    assert sum("OPENSORA_FAST_BACKEND=reference" in r.message for r in caplog.records) == 1


def test_backend_setting_validated(monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="OPENSORA_FAST_BACKEND"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9)


def test_backend_native_without_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    with pytest.raises(RuntimeError, match="cannot run natively on meta"):
        ops.ema_update_([torch.zeros(2, device="meta")], [torch.zeros(2, device="meta")], 0.9)


def test_info_reports_build():
    info = opensora_fast.build_info()
    for key in ("version", "torch", "native", "cuda_kernels", "cuda_archs", "ops"):
        assert key in info
    assert info["native"] is True
    assert "opensora_fast::ema_update_" in info["ops"]


# ---- the contract: one table of bad inputs, three ways ------------------------------


def _ema_cases():
    a, b, c = torch.ones(8), torch.ones(8), torch.ones(8)
    big = torch.ones(20)
    leaf = torch.zeros(3, requires_grad=True)
    return {
        "len": (
            [z(3)],
            [z(3), z(3)],
            0.9,
            ValueError,
            "ema_update_: ema and src must have the same length, got len(ema)=1 and len(src)=2",
        ),
        "decay>1": ([z(3)], [z(3)], 1.5, ValueError, "ema_update_: decay must be in [0, 1], got 1.5"),
        "decay just over 1": (
            [z(3)],
            [z(3)],
            1.0000001,
            ValueError,
            "ema_update_: decay must be in [0, 1], got 1.0000001",
        ),
        "decay 2": ([z(3)], [z(3)], 2.0, ValueError, "ema_update_: decay must be in [0, 1], got 2.0"),
        "decay<0": ([z(3)], [z(3)], -1e-05, ValueError, "ema_update_: decay must be in [0, 1], got -1e-05"),
        "decay nan": ([z(3)], [z(3)], math.nan, ValueError, "ema_update_: decay must be in [0, 1], got nan"),
        "empty + bad decay": ([], [], 7.0, ValueError, "ema_update_: decay must be in [0, 1], got 7.0"),
        "int ema": (
            [z(3), z(3, dtype=torch.int32)],
            [z(3), z(3)],
            0.9,
            TypeError,
            "ema_update_: ema[1] has dtype torch.int32; expected float32, bfloat16 or float16",
        ),
        "fp64 src": (
            [z(3), z(3)],
            [z(3), z(3, dtype=torch.float64)],
            0.9,
            TypeError,
            "ema_update_: src[1] has dtype torch.float64; expected float32, bfloat16 or float16",
        ),
        "shape": (
            [z(3), z(2, 3)],
            [z(3), z(6)],
            0.9,
            ValueError,
            "ema_update_: ema[1] has shape [2, 3] but src[1] has shape [6]",
        ),
        "device": (
            [z(3), z(3)],
            [z(3), z(3, device="meta")],
            0.9,
            ValueError,
            "ema_update_: ema[1] is on cpu but src[1] is on meta",
        ),
        "ema strided": ([z(3), z(3, 2)[:, 0]], [z(3), z(3)], 0.9, ValueError, "ema_update_: ema[1] is not contiguous"),
        "src strided": ([z(3), z(3)], [z(3), z(3, 2)[:, 0]], 0.9, ValueError, "ema_update_: src[1] is not contiguous"),
        "chain alias": (
            [a, b],
            [b, c],
            0.5,
            ValueError,
            "overlap in memory; every ema tensor must share no memory with any other tensor of the call",
        ),
        "same ema twice": ([a, a], [b, c], 0.5, ValueError, "ema_update_: ema[0] and ema[1] overlap in memory"),
        "ema is src": ([z(3), a], [z(3), a], 0.5, ValueError, "ema_update_: ema[1] and src[1] overlap in memory"),
        "overlapping views": ([z(3), big[2:10]], [z(3), big[5:13]], 0.5, ValueError, "overlap in memory"),
        "inference": (
            [z(3), inference_zeros(3)],
            [z(3), z(3)],
            0.5,
            RuntimeError,
            "ema_update_: ema[1] is an inference tensor; it can only be updated in place inside torch.inference_mode()",
        ),
        "leaf requires grad": (
            [z(3), leaf],
            [z(3), z(3)],
            0.5,
            RuntimeError,
            "ema_update_: ema[1] requires grad and grad mode is on; ema_update_ is not differentiable: call it under torch.no_grad()",
        ),
        "sparse": (
            [z(3), torch.zeros(3).to_sparse()],
            [z(3), torch.zeros(3).to_sparse()],
            0.5,
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
    }


EMA = _ema_cases()
EMA_OP = Contract(
    {"native": raw("ema_update_"), "reference": reference.ema.ema_update_, "fake": faked(raw("ema_update_"))}
)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(EMA))
def test_ema_check_contract(name, way):
    _, _, _, exc, text = EMA[name]
    assert_three_way(EMA_OP, way, lambda: _ema_cases()[name][:3], exc, text)  # fresh tensors per way


# ---- findings of the hardening review (each failed before its fix) ------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_wrapper_rejects_non_tensors_and_bad_scalars_alike(backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    e = z(3)
    for ema, src, decay, exc, text in [
        ([e, 3.0], [z(3), z(3)], 0.9, TypeError, "ema_update_: ema[1] must be a tensor, got float"),
        ([e], [None], 0.9, TypeError, "ema_update_: src[0] must be a tensor, got NoneType"),
        ([e], [z(3)], "0.5", TypeError, "ema_update_: decay must be a real number, got str"),
        ([], [], 1.5, ValueError, "ema_update_: decay must be in [0, 1], got 1.5"),
    ]:
        raises(lambda: ops.ema_update_(ema, src, decay), exc, text)
    assert bool((e == 0).all())


def test_version_counter_bumped_so_autograd_notices():
    x = torch.randn(3, requires_grad=True)
    e = torch.randn(3)
    y = (x * e).sum()  # saves e for backward
    v = e._version
    OP.ema_update_([e], [torch.zeros(3)], 0.5)
    assert e._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_inference_tensor_updated_inside_inference_mode():
    t = inference_zeros(5)
    with torch.inference_mode():
        OP.ema_update_([t], [torch.ones(5)], 0.5)
    assert bool((t == 0.5).all())


def test_leaf_requiring_grad_is_fine_under_no_grad():
    w = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        OP.ema_update_([w], [torch.ones(3)], 0.5)
    assert bool((w == 0.5).all())


def test_sources_may_alias_each_other():
    s = torch.randn(10)
    a, b = torch.zeros(10), torch.zeros(10)
    OP.ema_update_([a, b], [s, s], 0.5)
    ref = [torch.zeros(10), torch.zeros(10)]
    reference.ema.ema_update_(ref, [s, s], 0.5)
    assert_bitwise_equal(a, ref[0])
    assert_bitwise_equal(b, ref[1])


def test_reference_writes_nothing_when_a_later_pair_is_bad():
    e0, big = torch.ones(4), torch.ones(20)
    with pytest.raises(ValueError):
        reference.ema.ema_update_([e0, big[0:10]], [torch.zeros(4), big[5:15]], 0.5)
    assert bool((e0 == 1).all())
    with pytest.raises(RuntimeError):
        reference.ema.ema_update_([e0, inference_zeros(3)], [torch.zeros(4), torch.zeros(3)], 0.5)
    assert bool((e0 == 1).all())


def test_seed_beyond_int63_and_negative_seeds():
    x = torch.randn(1000).bfloat16()
    s = torch.randn(1000)
    for seed in (2**63, 2**64 - 1, -5, 2**70 + 3):
        a, b = x.clone(), x.clone()
        ops.ema_update_([a], [s], 0.9, stochastic=True, seed=seed)
        reference.ema.ema_update_([b], [s], 0.9, True, ops.ema._as_int64(seed))
        assert_bitwise_equal(a, b, f"seed {seed}")
    c = x.clone()
    ops.ema_update_([c], [s], 0.9, stochastic=False, seed=2**64 + 1)  # ignored in compat mode


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_written_as_one_canonical_pattern_on_both_backends(dtype, stochastic):
    e = torch.tensor([float("nan"), -float("nan"), 1.0, float("inf"), -float("inf"), 2.0], dtype=dtype)
    s = torch.tensor([1.0, 2.0, float("nan"), -float("inf"), float("inf"), 3.0])
    a, b = e.clone(), e.clone()
    OP.ema_update_([a], [s], 0.5, stochastic, 7)
    reference.ema.ema_update_([b], [s], 0.5, stochastic, 7)
    assert_bitwise_equal(a, b)
    nan = reference.ema.canonical_nan_(torch.tensor([float("nan")], dtype=dtype))
    assert int(a.isnan().sum()) == 5  # inf - inf is NaN too
    assert bool((bits(a)[a.isnan()] == bits(nan)[0]).all())


# ---- lazy views, layouts and scalar arguments: one error every way -----------------


def _neg_view(n=1):
    """A contiguous float32 tensor with its neg bit set (x.conj().imag of a 1-element complex)."""
    t = torch.randn(n, dtype=torch.complex64).conj().imag
    assert t.is_neg() and t.is_contiguous()
    return t


def _lazy_and_layout_cases():
    """(name, ema, src, exception, message): views and layouts every way must refuse
    with one error, before pair 0 (a valid pair) is written."""
    z = lambda n=1: torch.zeros(n)  # noqa: E731
    nested = lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])  # noqa: E731
    return [
        (
            "neg ema",
            [z(3), _neg_view()],
            [z(3), z()],
            ValueError,
            "ema_update_: ema[1] is a negated view (neg bit set, as in x.conj().imag); pass a tensor without it",
        ),
        (
            "neg src",
            [z(3), z()],
            [z(3), _neg_view()],
            ValueError,
            "ema_update_: src[1] is a negated view (neg bit set, as in x.conj().imag); pass a tensor without it",
        ),
        (
            "conj ema",
            [z(3), torch.zeros(1, dtype=torch.complex64).conj()],
            [z(3), z()],
            TypeError,
            "ema_update_: ema[1] has dtype torch.complex64; expected float32, bfloat16 or float16",
        ),
        (
            "nested ema",
            [z(3), nested()],
            [z(3), nested()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "nested src",
            [z(3), z(5)],
            [z(3), nested()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "sparse src",
            [z(3), z(3)],
            [z(3), z(3).to_sparse()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "csr ema",
            [z(3), torch.zeros(2, 3).to_sparse_csr()],
            [z(3), torch.zeros(2, 3)],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
    ]


EMA_LAZY = Contract(
    {
        "raw op": raw("ema_update_"),
        "reference": reference.ema.ema_update_,
        "fake": faked(raw("ema_update_")),
        "wrapper native": with_backend("native", ops.ema_update_),
        "wrapper reference": with_backend("reference", ops.ema_update_),
    },
    compare=("raw op", "reference", "fake", "wrapper native", "wrapper reference"),
)


@pytest.mark.parametrize("way", EMA_LAZY.compare)
@pytest.mark.parametrize("case", _lazy_and_layout_cases(), ids=lambda c: c[0])
def test_lazy_views_and_layouts_one_error_nothing_written(case, way):
    name, _, _, exc, text = case
    fakeable = not any(k in name for k in ("nested", "sparse", "csr"))
    if way == "fake" and not fakeable:
        pytest.skip("FakeTensorMode does not convert this layout")
    bases = []

    def fresh():
        _, ema, src, _, _ = next(c for c in _lazy_and_layout_cases() if c[0] == name)
        ema[0].fill_(1.0)  # pair 0 is valid: a write there would show
        src[0].fill_(2.0)
        if ema[1].is_neg():
            bases.append((ema[1]._base, ema[1]._base.clone()))
        return ema, src, 0.5

    ways = [w for w in EMA_LAZY.compare if fakeable or w != "fake"]
    assert assert_three_way(EMA_LAZY, way, fresh, exc, text, compare=ways).startswith(text)
    for base, before in bases:
        assert torch.equal(base, before), "the negated ema was written"


def test_jagged_nested_tensor_one_error_on_both_backends(monkeypatch):
    # A python tensor subclass without this op refuses it at dispatch (NotImplementedError):
    # the wrapper reports what the reference reports.
    for backend in ("native", "reference"):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        for ema_nested in (True, False):
            e0 = torch.ones(3)
            jag = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
            ema = [e0, jag if ema_nested else torch.ones(5)]
            src = [torch.full((3,), 2.0), jag.clone() if ema_nested else jag]
            with pytest.raises(ValueError, match=r"ema\[1\] and src\[1\] must be dense \(strided\) tensors"):
                ops.ema_update_(ema, src, 0.5)
            assert torch.all(e0 == 1.0), backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    "kwargs,text",
    [
        (dict(stochastic="False"), "ema_update_: stochastic must be a bool, got str"),
        (dict(stochastic=1), "ema_update_: stochastic must be a bool, got int"),
        (dict(stochastic=None), "ema_update_: stochastic must be a bool, got NoneType"),
        (dict(decay=True), "ema_update_: decay must be a real number, got bool"),
        (dict(decay=False), "ema_update_: decay must be a real number, got bool"),
        (dict(stochastic=True, seed=True), "ema_update_: seed must be an int, got bool"),
        (dict(seed=False), "ema_update_: seed must be an int, got bool"),  # compat mode: still checked
        (dict(stochastic=True, seed=1.0), "ema_update_: seed must be an int, got float"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else "",
)
def test_scalar_arguments_type_checked(kwargs, text, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    e = torch.ones(4, dtype=torch.bfloat16)
    kwargs = dict(kwargs)
    decay = kwargs.pop("decay", 0.5)
    with pytest.raises(TypeError) as info:
        ops.ema_update_([e], [torch.full((4,), 2.0)], decay, **kwargs)
    assert str(info.value) == text
    assert torch.all(e == 1.0)


def _graph_recorder():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return graphs, backend


def _compiled_step():
    def step(ema, src):
        ops.ema_update_(ema, src, 0.9)

    return step


def test_compiled_choice_follows_backend_setting(monkeypatch, caplog):
    # The traced choice obeys OPENSORA_FAST_BACKEND, and a changed setting
    # retraces (dynamo guards on the environment read) instead of reusing the
    # graph traced under the other setting.
    torch._dynamo.reset()
    graphs, backend = _graph_recorder()
    f = torch.compile(_compiled_step(), backend=backend)
    src = [torch.linspace(-1, 1, 37)]
    want = [torch.zeros(37)]
    upstream(want, src, 0.9)

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "auto")
    ema = [torch.zeros(37)]
    f(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert any("opensora_fast" in g for g in graphs), "auto: the native op is traced"

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    monkeypatch.setattr(opensora_fast._ext, "_told", set())
    graphs.clear()
    ema = [torch.zeros(37)]
    with caplog.at_level("WARNING", logger="opensora_fast"):
        f(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert not any("opensora_fast" in g for g in graphs), "reference: the native op was traced"
    assert any("OPENSORA_FAST_BACKEND=reference" in r.message for r in caplog.records), "the auto graph was reused"

    # and "native" where there is no kernel is the eager error, not a reused graph
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    monkeypatch.setitem(opensora_fast._ext._kernels, ("ema_update_", "cpu"), False)
    with pytest.raises(RuntimeError, match="cannot run natively on cpu"):
        f([torch.zeros(37)], src)
    torch._dynamo.reset()


def test_compiled_choice_follows_kernel_availability(monkeypatch):
    # As eager: no kernel for the traced tensors' device -> the reference, not
    # a graph that calls the op into its "no kernel" fallback.
    torch._dynamo.reset()
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "auto")
    monkeypatch.setitem(opensora_fast._ext._kernels, ("ema_update_", "cpu"), False)
    graphs, backend = _graph_recorder()
    src = [torch.linspace(-1, 1, 37)]
    ema, want = [torch.zeros(37)], [torch.zeros(37)]
    upstream(want, src, 0.9)
    torch.compile(_compiled_step(), backend=backend)(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert graphs and not any("opensora_fast" in g for g in graphs)
    # and "native" without a kernel is the eager error, traced or not
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="cannot run natively on cpu"):
            torch.compile(_compiled_step(), backend=backend, fullgraph=fullgraph)([torch.zeros(3)], [torch.ones(3)])
    torch._dynamo.reset()


def test_traced_choice_carries_the_constant_result_mark():
    """_ext marks _traced_choice by hand (no torch._dynamo import when the package
    loads); the public decorator must still mean exactly that mark."""
    from opensora_fast import _ext

    def probe():
        return 1

    assert torch.compiler.assume_constant_result(probe) is probe
    assert getattr(probe, "_dynamo_marked_constant", False) is True
    assert _ext._traced_choice._dynamo_marked_constant is True


# ---- property-based: native (and the walked CUDA body) vs reference ----------------
# (profile "ci": fixed and bounded; --hypothesis-profile=long explores further)

SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0, 3.0e38]


def _values(draw, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if n and draw(st.booleans()):  # a few special values
        for _ in range(draw(st.integers(1, 3))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return x.to(dtype)


# Aliasing injected into an EMA call. The refused kinds write into memory that
# another tensor of the call covers; two sources sharing memory is legal.
EMA_REFUSED = ("src_is_ema", "ema_twice", "src_overlaps_ema", "ema_overlaps_ema")
EMA_LEGAL = ("src_shared", "src_overlaps_src")


@dataclasses.dataclass
class EmaCall:
    """One drawn ema_update_ call. ``build()`` makes fresh tensors each time and
    recreates the alias among them, so a backend sees the aliasing itself (a
    clone of a drawn list would not share memory any more)."""

    pairs: list  # (ema values, ema offset, src values, src offset) per pair
    alias: Optional[tuple]  # (kind, i, j, shift): pair j's tensor taken from pair i's memory
    decay: float
    stochastic: bool
    seed: int

    @property
    def refused(self) -> bool:
        return self.alias is not None and self.alias[0] in EMA_REFUSED

    def build(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        room = max((len(p[0]) for p in self.pairs), default=0) + 3  # for a shifted view
        ema, src, ebufs, sbufs = [], [], [], []
        for ev, eo, sv, so in self.pairs:
            for vals, off, views, bufs, fill in ((ev, eo, ema, ebufs, 0.25), (sv, so, src, sbufs, -0.5)):
                buf = torch.full((off + len(vals) + room,), fill, dtype=vals.dtype)
                buf[off : off + len(vals)] = vals
                bufs.append(buf)
                views.append(buf[off : off + len(vals)])
        if self.alias is None:
            return ema, src
        kind, i, j, shift = self.alias
        m = len(self.pairs[j][0])
        if kind == "src_is_ema":
            src[j] = ema[i]
        elif kind == "ema_twice":
            ema[j] = ema[i]
        elif kind == "src_shared":
            src[j] = src[i]
        elif kind == "src_overlaps_ema":
            src[j] = ebufs[i][self.pairs[i][1] + shift :][:m]
        elif kind == "ema_overlaps_ema":
            ema[j] = ebufs[i][self.pairs[i][1] + shift :][:m]
        else:  # src_overlaps_src
            src[j] = sbufs[i][self.pairs[i][3] + shift :][:m]
        return ema, src


@st.composite
def ema_calls(draw) -> EmaCall:
    k = draw(st.integers(0, 6))
    pairs = []
    for _ in range(k):
        n = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 4099]))
        edt, sdt = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
        seed = draw(st.integers(0, 2**31))
        ev, sv = _values(draw, n, edt, seed), _values(draw, n, sdt, seed + 1)
        pairs.append((ev, draw(st.integers(0, 7)), sv, draw(st.integers(0, 7))))
    alias = None
    live = [i for i, p in enumerate(pairs) if len(p[0])]  # an empty tensor covers no memory
    if live and draw(st.integers(0, 2)) == 0:
        kind = draw(st.sampled_from(EMA_REFUSED + EMA_LEGAL))
        i = draw(st.sampled_from(live))
        n = len(pairs[i][0])
        if kind in ("ema_twice", "src_shared", "ema_overlaps_ema"):  # another pair
            j = draw(st.sampled_from([j for j in range(len(pairs)) if j != i] or [len(pairs)]))
            if j == len(pairs) or (kind != "ema_overlaps_ema" and len(pairs[j][0]) != n) or not len(pairs[j][0]):
                ev, sv = _values(draw, n, pairs[i][0].dtype, 1), _values(draw, n, pairs[i][2].dtype, 2)
                pairs[j : j + 1] = [(ev, draw(st.integers(0, 7)), sv, draw(st.integers(0, 7)))]
        elif kind == "src_is_ema":
            j = draw(st.sampled_from([j for j in live if len(pairs[j][0]) == n]))
        else:
            j = draw(st.sampled_from(live))
        m, shift = len(pairs[j][0]), 0
        if "overlaps" in kind:  # a view of pair j's length sharing at least one element with pair i's tensor
            off = pairs[i][3] if kind == "src_overlaps_src" else pairs[i][1]
            shift = draw(st.integers(-min(off, m - 1), n - 1))
        alias = (kind, i, j, shift)
    event(f"alias: {alias[0] if alias else 'none'}")
    decay = draw(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.999, 0.9999]) | st.floats(0, 1))
    return EmaCall(pairs, alias, decay, draw(st.booleans()), draw(st.integers(-(2**63), 2**63 - 1)))


def _outcome(fn, call: EmaCall):
    """(error type, first line of its message, ema after the call), on fresh tensors.
    A refused call must leave every ema as it was."""
    ema, src = call.build()
    before = [e.clone() for e in ema]
    try:
        fn(ema, src, call.decay, call.stochastic, call.seed)
    except Exception as e:  # noqa: BLE001 - the contract: same type, same message
        for a, b in zip(ema, before):
            assert_bitwise_equal(a, b, "written before the error")
        return type(e), str(e).splitlines()[0], None
    return None, None, ema


@given(ema_calls())
def test_ema_native_equals_reference(call):
    nat = _outcome(OP.ema_update_, call)
    ref = _outcome(reference.ema.ema_update_, call)
    assert nat[:2] == ref[:2]
    # an injected alias reaches the op and is refused; nothing else is
    assert (nat[0] is not None) == call.refused, nat[:2]
    if call.refused:
        assert nat[0] is ValueError and "overlap in memory" in nat[1], nat[:2]
        return
    _, src = call.build()
    for a, b, s in zip(nat[2], ref[2], src):
        same_reduced = a.dtype == s.dtype and a.dtype != torch.float32 and not call.stochastic
        assert_ema_matches_reference(a, b, s, call.decay, same_reduced)


@given(ema_calls(), st.sampled_from([(0, 0, False), (3, 5, False), (0, 0, True), (2, 3, True)]))
def test_ema_grid_walk_equals_cpu_kernel(call, limits):
    nat = _outcome(OP.ema_update_, call)
    walk = _outcome(lambda e, s, d, st_, sd: OP._ema_update_grid_walk_(e, s, d, st_, sd, *limits), call)
    assert nat[:2] == walk[:2]
    assert (walk[0] is not None) == call.refused, walk[:2]
    for a, b in zip(nat[2] or [], walk[2] or []):
        assert_bitwise_equal(a, b)


# ---- the persistent CUDA schedule walked on the CPU -------------------------------
# (csrc/ema/ema.h: units of 16384 elements, tensors <= 4096 elements packed up to
# 32 a unit, a grid capped at max_blocks blocks striding over the units)

# (max_tensors, max_blocks, small_table): the H100 grid (528) on big and small
# tables, tiny tables (packs of 2-4) with a grid of 3 or 5, one block or two
# striding over everything
SCHEDULES = [(0, 0, False), (0, 0, True), (4, 3, False), (2, 5, True), (0, 1, False), (0, 2, True)]


def _schedule_case(edt, sdt, seed, ema_fill=None, src_fill=None):
    """Odd sizes around the unit and pack limits, a tensor of many units, 100
    tiny tensors (packed), and views: equally misaligned ema and src (vectors
    after a peeled head) and unequally misaligned ones (single elements)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 5, 7, 8, 15, 17, 4095, 4096, 4097, 16383, 16384, 16385, 3 * 16384 + 5, 70_001]
    sizes += [1 + i % 9 for i in range(100)] + [33, 4099]
    offsets = [(0, 0)] * 16 + [(0, 0)] * 100 + [(1, 1), (2, 3)]
    offsets[14], offsets[15], offsets[4] = (3, 3), (1, 1), (5, 2)
    ema, src = [], []
    for n, (eo, so) in zip(sizes, offsets):
        e = rand(n + eo, edt, g) if ema_fill is None else torch.full((n + eo,), ema_fill, dtype=edt)
        s = rand(n + so, sdt, g, scale=3.0) if src_fill is None else torch.full((n + so,), src_fill, dtype=sdt)
        ema.append(e[eo:])
        src.append(s[so:])
    return ema, src


@pytest.mark.parametrize(
    "schedule", [SCHEDULES[0], SCHEDULES[3]], ids=lambda s: "t{}-g{}-{}".format(s[0], s[1], "small" if s[2] else "big")
)
@pytest.mark.parametrize("stochastic", [False, True], ids=["compat", "stochastic"])
@pytest.mark.parametrize("edt,sdt", PAIRS, ids=[tag(e, s).replace("/", "-") for e, s in PAIRS])
def test_grid_walk_persistent_schedule_equals_cpu_kernel(edt, sdt, stochastic, schedule):
    # Every block of the persistent grid, every stride step, the packs and the
    # peeled heads: bit for bit the CPU kernel (itself checked against upstream),
    # and the stochastic stream a function of (seed, element) only.
    ema, src = _schedule_case(edt, sdt, FLOATS.index(edt) * 3 + FLOATS.index(sdt))
    want = [e.clone() for e in ema]
    OP.ema_update_(want, src, 0.999, stochastic, 1234567)
    OP._ema_update_grid_walk_(ema, src, 0.999, stochastic, 1234567, *schedule)
    if not torch.equal(bits(torch.cat(ema)), bits(torch.cat(want))):  # one compare; name the pair on failure
        for i, (a, b) in enumerate(zip(ema, want)):
            assert_bitwise_equal(a, b, f"{tag(edt, sdt)} pair {i} (numel {a.numel()})")
        raise AssertionError("the concatenations differ but no pair does")


@pytest.mark.parametrize("schedule", SCHEDULES + [(3, 7, False), (0, 528, True)], ids=str)
@pytest.mark.parametrize("stochastic", [False, True])
def test_grid_walk_updates_every_element_exactly_once(stochastic, schedule):
    # ema 1, src 0, decay 0.5: exactly 0.5 after one update in every dtype and
    # rounding mode; 1 if an element is missed, 0.25 if updated twice. The
    # padding before a misaligned view stays 1.
    for edt, sdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]:
        ema, src = _schedule_case(edt, sdt, 0, ema_fill=1.0, src_fill=0.0)
        OP._ema_update_grid_walk_(ema, src, 0.5, stochastic, 5, *schedule)
        pads = [torch.as_strided(e, (e.storage_offset(),), (1,), 0) for e in ema]
        if bool((torch.cat(ema) == 0.5).all()) and bool((torch.cat(pads) == 1.0).all()):
            continue
        for i, e in enumerate(ema):  # name the first bad pair
            assert bool((e == 0.5).all()), f"{tag(edt, sdt)} pair {i} (numel {e.numel()}): {e.unique().tolist()}"
            whole = torch.as_strided(e, (e.storage_offset(),), (1,), 0)
            assert bool((whole == 1.0).all()), f"pair {i}: written before its view"


@pytest.mark.parametrize("stochastic", [False, True])
def test_grid_walk_11b_shard_list_equals_cpu_kernel(stochastic):
    # The 1082-tensor layout (world 4096: every shard small, most packed) with
    # every dtype pair, on the big tables (one launch) and the small ones.
    g = torch.Generator().manual_seed(3)
    sizes = shard_sizes(4096)
    ema = [rand(n, FLOATS[i % 3], g) for i, n in enumerate(sizes)]
    src = [rand(n, FLOATS[(i // 3) % 3], g) for i, n in enumerate(sizes)]
    want = [e.clone() for e in ema]
    OP.ema_update_(want, src, 0.9999, stochastic, 42)
    for small in (False, True):
        walked = [e.clone() for e in ema]
        OP._ema_update_grid_walk_(walked, src, 0.9999, stochastic, 42, 0, 0, small)
        for i, (a, b) in enumerate(zip(walked, want)):
            assert_bitwise_equal(a, b, f"pair {i} small={small}")


# ---- CUDA (marked `cuda`: skipped without a GPU; benchmarks/gpu_check.sh runs them) ----


@pytest.mark.cuda
@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_cuda_parity(edt, sdt):
    g = torch.Generator().manual_seed(11)
    sizes = [0, 1, 3, 4099, 2**20 + 3, 32768 * 330 + 1]
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    want = [e.clone() for e in ema]
    torch.ops.opensora_fast.ema_update_(want, src, 0.9999)  # our CPU op: the same arithmetic
    dev_e = [e.cuda() for e in ema]
    dev_s = [s.cuda() for s in src]
    torch_cuda = [e.clone() for e in dev_e]
    upstream(torch_cuda, dev_s, 0.9999)
    ops.ema_update_(dev_e, dev_s, 0.9999)
    for i, (a, b, c) in enumerate(zip(dev_e, want, torch_cuda)):
        assert_bitwise_equal(a, b, f"vs our CPU op, pair {i}")  # same arithmetic as the CPU
        # vs torch's own CUDA: identical, or one rounding of (1-d)*src apart
        # where it keeps alpha in fp32 (same reduced dtype on both sides)
        d = (a.float() - c.float()).abs()
        bound = torch.finfo(edt).eps * (c.float().abs() + (1e-4 * dev_s[i].float()).abs()) + torch.finfo(edt).tiny
        assert bool((d <= bound).all()), f"pair {i}"
    sr = [e.clone() for e in ema]
    sr_dev = [e.cuda() for e in ema]
    ops.ema_update_(sr, src, 0.9999, stochastic=True, seed=8)
    ops.ema_update_(sr_dev, dev_s, 0.9999, stochastic=True, seed=8)
    for a, b in zip(sr_dev, sr):
        assert_bitwise_equal(a, b, "stochastic CPU vs CUDA")


@pytest.mark.cuda
def test_cuda_no_host_sync():
    sizes = shard_sizes(96)[:200]
    ema = [torch.randn(n, device="cuda").bfloat16() for n in sizes]
    src = [torch.randn(n, device="cuda") for n in sizes]
    ops.ema_update_(ema, src, 0.9999)  # warm: first call may load things
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.ema_update_(ema, src, 0.9999)
        ops.ema_update_(ema, src, 0.9999, stochastic=True, seed=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"src\[0\] is on cpu"):
        ops.ema_update_([torch.zeros(3, device="cuda")], [torch.zeros(3)], 0.9)


def _ema_case(edt_sdt_pairs, sizes, seed, misalign=False):
    g = torch.Generator().manual_seed(seed)
    ema, src = [], []
    for i, n in enumerate(sizes):
        edt, sdt = edt_sdt_pairs[i % len(edt_sdt_pairs)]
        e, s = rand(n + 1, edt, g), rand(n + 1, sdt, g, scale=3.0)
        ema.append(e[1:] if misalign and i % 2 else e[:n].clone())
        src.append(s[1:] if misalign and i % 3 == 0 else s[:n].clone())
    return ema, src


@pytest.mark.cuda
@pytest.mark.parametrize("stochastic", [False, True])
def test_ema_many_tensors_and_a_tensor_over_2048_chunks(stochastic):
    # > 256 tensors (several launches), one of 2048*32768 + 5 elements (split
    # across tables), misaligned views and every dtype pair in one call.
    sizes = [1, 3, 4099, 2048 * 32768 + 5] + [64 + i for i in range(300)]
    ema, src = _ema_case(PAIRS, sizes, 1, misalign=True)
    want = [e.clone() for e in ema]
    OP.ema_update_(want, src, 0.9999, stochastic, 77)  # our CPU op
    dev_e, dev_s = [e.cuda() for e in ema], [s.cuda() for s in src]
    OP.ema_update_(dev_e, dev_s, 0.9999, stochastic, 77)
    for i, (a, b) in enumerate(zip(dev_e, want)):
        assert_bitwise_equal(a, b, f"pair {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_ema_vs_upstream_on_cuda_within_documented_tolerance(edt, sdt):
    g = torch.Generator().manual_seed(2)
    e, s = rand(70001, edt, g, device="cuda"), rand(70001, sdt, g, device="cuda")
    mine, theirs = e.clone(), e.clone()
    ops.ema_update_([mine], [s], 0.999)
    theirs.mul_(0.999).add_(s, alpha=1 - 0.999)  # torch's own CUDA kernels
    ref = e.cpu()  # and the CPU reference on copies of the inputs
    reference.ema.ema_update_([ref], [s.cpu()], 0.999)
    assert_ema_matches_reference(mine, ref, s, 0.999, edt == sdt and edt != torch.float32)
    if edt == sdt and edt != torch.float32:  # torch CUDA keeps alpha in fp32 here
        bound = torch.finfo(edt).eps * (theirs.float().abs() + (0.001 * s.float()).abs()) + torch.finfo(edt).tiny
        assert bool(((mine.float() - theirs.float()).abs() <= bound).all())
    else:
        assert_bitwise_equal(mine, theirs)


@pytest.mark.cuda
def test_ema_side_stream_graph_capture_and_no_sync():
    sizes = shard_sizes(96)[:300]
    ema = [torch.randn(n, device="cuda").bfloat16() for n in sizes]
    src = [torch.randn(n, device="cuda") for n in sizes]
    # bf16 ema, fp32 src: the reference is bitwise here (no same-dtype add quirk)
    src_cpu = [s.cpu() for s in src]
    want = [e.cpu() for e in ema]
    reference.ema.ema_update_(want, src_cpu, 0.99)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.ema_update_(ema, src, 0.99)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(ema, want):
        assert_bitwise_equal(a, b)
    # captured compat update, replayed twice == two eager steps
    eager = [e.clone() for e in ema]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OP.ema_update_(ema, src, 0.99)
    graph.replay()
    graph.replay()
    OP.ema_update_(eager, src, 0.99)
    OP.ema_update_(eager, src, 0.99)
    torch.cuda.synchronize()
    for _ in range(2):  # the expected two steps, on the CPU
        reference.ema.ema_update_(want, src_cpu, 0.99)
    for a, b, w in zip(ema, eager, want):
        assert_bitwise_equal(a, w, "graph replay vs CPU reference")
        assert_bitwise_equal(b, w, "eager vs CPU reference")


@pytest.mark.cuda
def test_ema_stochastic_refused_under_capture_and_writes_nothing():
    e = torch.randn(1000, device="cuda").bfloat16()
    before = e.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            OP.ema_update_([e], [torch.randn(1000, device="cuda")], 0.99, True, 1)
    assert_bitwise_equal(e, before)


@pytest.mark.cuda
@pytest.mark.slow
def test_ema_over_2_pow_31_elements():
    n = 2**31 + 4099
    if free_cuda_bytes() < n * 6 + (1 << 30):
        pytest.skip("not enough GPU memory")
    e = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    s = torch.ones(n, device="cuda")
    OP.ema_update_([e], [s], 0.5)
    assert float(e[-1]) == 0.5 and float(e[2**31 + 1]) == 0.5 and float(e[0]) == 0.5
    del e, s


# ---- CPU ISA variants (baseline, AVX2, AVX-512): the same bits in every one ----------------

ISA_SIZES = [0, 1, 15, 33, 4099, 70001]


@needs_native
@pytest.mark.parametrize("edt", FLOATS, ids=str)
@pytest.mark.parametrize("sdt", FLOATS, ids=str)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ema_same_bits_in_every_variant(edt, sdt, stochastic):
    gen = torch.Generator().manual_seed(3)
    ema = [with_specials(n, edt, gen) for n in ISA_SIZES]
    src = [with_specials(n, sdt, gen) for n in ISA_SIZES]
    ema.append(torch.randn(1001, generator=gen).to(edt)[1:])  # storage offset: unaligned
    src.append(torch.randn(1003, generator=gen).to(sdt)[3:])

    def run():
        e = [x.clone() for x in ema]
        OP.ema_update_(e, src, 0.9, stochastic, 17)
        return e

    out = each_isa(run)
    for isa, got in out.items():
        for i, (a, b) in enumerate(zip(got, out["baseline"])):
            assert_bitwise_equal(a, b, f"{isa} {edt}<-{sdt} [{i}]")


# ---- edge shapes, on the CPU and CUDA -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ema_lists_of_only_empty_tensors(device, stochastic):
    skip_without_native()
    ema = [torch.zeros(0, device=device), torch.zeros(0, 3, dtype=torch.bfloat16, device=device)]
    src = [torch.zeros(0, device=device), torch.zeros(0, 3, device=device)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        OP.ema_update_(ema, src, 0.9, stochastic, 1)
        ops.ema_update_(ema, src, 0.9)
        OP.ema_update_([], [], 0.9, stochastic, 1)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    reference.ema.ema_update_([e.cpu() for e in ema], [s.cpu() for s in src], 0.9)
    assert [tuple(e.shape) for e in ema] == [(0,), (0, 3)]
