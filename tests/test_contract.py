"""One contract per op, three ways: the raw native op, the PyTorch reference and
the fake (FakeTensorMode) raise the same exception type with the same message on
every bad input, and write nothing. Plus one regression test per finding of the
hardening review (each failed before its fix)."""

import math
import os

import pytest
import torch
from helpers import assert_bitwise_equal, bits
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.utils.train import get_batch_loss, update_ema

pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
OP = torch.ops.opensora_fast


def z(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _inference(n):
    with torch.inference_mode():
        return torch.zeros(n)


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
            [z(3), _inference(3)],
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


WAYS = ["native", "reference", "fake"]
EMA = _ema_cases()


def _raises(fn, exc, text):
    with pytest.raises(Exception) as info:
        fn()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert text in str(info.value).splitlines()[0] or text in str(info.value), str(info.value)
    return str(info.value).splitlines()[0]


def _fake_call(fn, args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, args)
        fn(*fargs)


def _three_ways(way, call, fresh, exc, text):
    """The first line of the error ``call(way)`` raises, after checking that the
    two other ways raise the same type with the same line (on ``fresh()`` inputs)."""
    msg = _raises(lambda: call(way, *fresh()), exc, text)
    for other in WAYS:
        if other != way:
            assert _raises(lambda: call(other, *fresh()), exc, text) == msg, (way, other)
    return msg


def _ema_call(way, ema, src, decay):
    if way == "native":
        return OP.ema_update_(ema, src, decay)
    if way == "reference":
        return reference.ema.ema_update_(ema, src, decay)
    return _fake_call(lambda e, s: OP.ema_update_(e, s, decay), (ema, src))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(EMA))
def test_ema_check_contract(name, way):
    ema, src, decay, exc, text = _ema_cases()[name]  # fresh tensors per run
    before = [e.clone() if e.layout == torch.strided and e.device.type == "cpu" else None for e in ema]
    _raises(lambda: _ema_call(way, ema, src, decay), exc, text)
    for e, b in zip(ema, before):
        if b is not None:
            assert_bitwise_equal(e.detach(), b.detach(), f"{name}: written before the error")
    # the three ways say exactly the same thing (each against the two others)
    _three_ways(way, _ema_call, lambda: _ema_cases()[name][:3], exc, text)


def _mse_cases():
    p, r = z(2, 5, 3), torch.tensor([[0, 5], [1, 3]])
    return {
        "pred 2-D": (z(2, 5), z(2, 5), r, ValueError, "masked_mse: pred must be [B, L, D], got shape [2, 5]"),
        "target shape": (
            p,
            z(2, 5, 4),
            r,
            ValueError,
            "masked_mse: target has shape [2, 5, 4] but pred has shape [2, 5, 3]",
        ),
        "int pred": (
            z(2, 5, 3, dtype=torch.int32),
            z(2, 5, 3, dtype=torch.int32),
            r,
            TypeError,
            "masked_mse: pred has dtype torch.int32; expected float32, bfloat16, float16 or float64",
        ),
        "target dtype": (
            p,
            z(2, 5, 3, dtype=torch.bfloat16),
            r,
            TypeError,
            "masked_mse: target has dtype torch.bfloat16 but pred has dtype torch.float32",
        ),
        "target device": (
            p,
            z(2, 5, 3, device="meta"),
            r,
            ValueError,
            "masked_mse: target is on meta but pred is on cpu",
        ),
        "ranges dtype": (p, z(2, 5, 3), r.int(), TypeError, "masked_mse: ranges must be int64, got torch.int32"),
        "ranges shape": (p, z(2, 5, 3), r[:1], ValueError, "masked_mse: ranges must be [B, 2] = [2, 2], got [1, 2]"),
        "pred strided": (
            z(2, 5, 6)[..., ::2],
            z(2, 5, 3),
            r,
            ValueError,
            "masked_mse: pred, target and ranges must be contiguous",
        ),
        "sparse": (
            z(2, 5, 3).to_sparse(),
            z(2, 5, 3),
            r,
            ValueError,
            "masked_mse: pred, target and ranges must be dense (strided) tensors",
        ),
        "inference pred 2-D": (
            _inference(4).view(2, 2),
            z(2, 2),
            r,
            ValueError,
            "masked_mse: pred must be [B, L, D], got shape [2, 2]",
        ),
        "pred None": (None, p, r, TypeError, "masked_mse: pred must be a tensor, got NoneType"),
        "target None": (p, None, r, TypeError, "masked_mse: target must be a tensor, got NoneType"),
        "ranges None": (p, p, None, TypeError, "masked_mse: ranges must be a tensor, got NoneType"),
    }


MSE = _mse_cases()


def _mse_call(way, pred, target, ranges):
    if way == "native":
        return OP.masked_mse(pred, target, ranges)
    if way == "reference":
        return reference.masked_mse.masked_mse(pred, target, ranges)
    return _fake_call(OP.masked_mse, (pred, target, ranges))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(MSE))
def test_masked_mse_check_contract(name, way):
    _, _, _, exc, text = MSE[name]
    _three_ways(way, _mse_call, lambda: _mse_cases()[name][:3], exc, text)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nested_inputs_refused_alike(backend, monkeypatch):
    # FakeTensorMode cannot convert a nested tensor, so this one is two ways:
    # the raw op / the reference, and the public wrappers on either backend.
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    nt = torch.nested.nested_tensor([z(5, 3), z(5, 3)])
    njt = torch.nested.nested_tensor([z(5, 3), z(4, 3)], layout=torch.jagged)
    r = torch.tensor([[0, 5], [1, 3]])
    dense = "masked_mse: pred, target and ranges must be dense (strided) tensors"
    for x in (nt, njt):
        for fn in (OP.masked_mse, reference.masked_mse.masked_mse, ops.masked_mse):
            _raises(lambda: fn(x, x, r), ValueError, dense)
    for fn in (OP.masked_mse_backward, reference.masked_mse.masked_mse_backward):
        _raises(lambda: fn(torch.tensor(1.0), nt, nt, r), ValueError, dense)
    frame = torch.nested.nested_tensor([z(3), z(3)])
    for fn in (
        lambda: OP.loss_ranges(frame, 4, True),
        lambda: reference.masked_mse.loss_ranges(frame, 4, True),
        lambda: ops.loss_ranges(frame, 4),
    ):
        _raises(fn, ValueError, "loss_ranges: frame_mask must be a dense (strided) tensor")


def _ranges_cases():
    return {
        "3-D": (z(2, 3, 1), 4, ValueError, "loss_ranges: frame_mask must be [B, T], got shape [2, 3, 1]"),
        "complex": (
            torch.zeros(2, 3, dtype=torch.complex64),
            4,
            TypeError,
            "loss_ranges: frame_mask has dtype torch.complex64; expected a real or bool dtype",
        ),
        "no frames": (z(2, 0), 4, ValueError, "loss_ranges: frame_mask has no frames (T=0)"),
        "negative hw": (z(2, 3), -1, ValueError, "loss_ranges: hw must be >= 0, got -1"),
        "sparse": (z(2, 3).to_sparse(), 4, ValueError, "loss_ranges: frame_mask must be a dense (strided) tensor"),
        "None": (None, 4, TypeError, "loss_ranges: frame_mask must be a tensor, got NoneType"),
        # sub-byte and bits dtypes: no comparison with 1 in torch
        "uint4": (
            torch.zeros(2, 3, dtype=torch.uint4),
            4,
            TypeError,
            "loss_ranges: frame_mask has dtype torch.uint4; expected a real or bool dtype",
        ),
        "bits8": (
            torch.zeros(2, 3, dtype=torch.bits8),
            4,
            TypeError,
            "loss_ranges: frame_mask has dtype torch.bits8; expected a real or bool dtype",
        ),
        "float4": (
            torch.zeros(2, 3, dtype=torch.float4_e2m1fn_x2),
            4,
            TypeError,
            "loss_ranges: frame_mask has dtype torch.float4_e2m1fn_x2; expected a real or bool dtype",
        ),
        # T * hw past int64: once silently wrapped ranges on both backends
        "T*hw > int64": (
            z(2, 3),
            2**62,
            ValueError,
            "loss_ranges: T * hw = 3 * 4611686018427387904 does not fit in int64",
        ),
        "T*hw = int64 max + 1": (
            z(2, 2),
            2**62,
            ValueError,
            "loss_ranges: T * hw = 2 * 4611686018427387904 does not fit in int64",
        ),
        "hw int64 max": (
            z(2, 2),
            2**63 - 1,
            ValueError,
            "loss_ranges: T * hw = 2 * 9223372036854775807 does not fit in int64",
        ),
    }


def _ranges_call(way, frame, hw):
    if way == "native":
        return OP.loss_ranges(frame, hw, True)
    if way == "reference":
        return reference.masked_mse.loss_ranges(frame, hw, True)
    return _fake_call(lambda f: OP.loss_ranges(f, hw, True), (frame,))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(_ranges_cases()))
def test_loss_ranges_check_contract(name, way):
    _, _, exc, text = _ranges_cases()[name]
    _three_ways(way, _ranges_call, lambda: _ranges_cases()[name][:2], exc, text)


def _grad_cases():
    return {
        "grad shape": (z(1), ValueError, "masked_mse_backward: grad must be a scalar (0-dim), got shape [1]"),
        "grad complex": (
            torch.zeros((), dtype=torch.complex64),
            TypeError,
            "masked_mse_backward: grad has dtype torch.complex64; expected float32, bfloat16, float16 or float64",
        ),
        "grad device": (
            torch.zeros((), device="meta"),
            ValueError,
            "masked_mse_backward: grad is on meta but pred is on cpu",
        ),
        "grad None": (None, TypeError, "masked_mse_backward: grad must be a tensor, got NoneType"),
        "grad sparse": (
            torch.tensor(1.0).to_sparse(),
            ValueError,
            "masked_mse_backward: grad must be a dense (strided) tensor",
        ),
    }


@pytest.mark.parametrize("way", ["native", "walk", "reference", "fake"])
@pytest.mark.parametrize("name", list(_grad_cases()))
def test_masked_mse_backward_check_contract(name, way):
    grad, exc, text = _grad_cases()[name]
    p, t, r = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.tensor([[0, 5], [1, 3]])
    fns = {
        "native": lambda: OP.masked_mse_backward(grad, p, t, r),
        "walk": lambda: OP._masked_mse_grid_walk(grad, p, t, r),  # segfaulted on a wrong grad shape
        "reference": lambda: reference.masked_mse.masked_mse_backward(grad, p, t, r),
        "fake": lambda: _fake_call(OP.masked_mse_backward, (grad, p, t, r)),
    }
    msg = _raises(fns[way], exc, text)
    for other in ("native", "reference", "fake"):  # the same line from the other ways
        if other != way:
            assert _raises(fns[other], exc, text) == msg, (way, other)


# ----------------------------------------------------------------- EMA findings


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
        _raises(lambda: ops.ema_update_(ema, src, decay), exc, text)
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
    t = _inference(5)
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
        reference.ema.ema_update_([e0, _inference(3)], [torch.zeros(4), torch.zeros(3)], 0.5)
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


# ----------------------------------------------------------- masked MSE findings


def test_reference_ignores_nan_and_inf_outside_the_ranges():
    p, t = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, 4)
    r = torch.tensor([[1, 4], [0, 2]])
    with torch.no_grad():
        p[0, 0] = float("nan")
        p[0, 5] = float("inf")
        p[1, 3] = float("nan")
    for fn in (reference.masked_mse.masked_mse, OP.masked_mse, ops.masked_mse):
        loss = fn(p, t, r)
        (g,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(loss), fn
        assert bool(torch.isfinite(g).all()), fn
        assert float(g[0, 0].abs().sum()) == 0 and float(g[1, 3].abs().sum()) == 0


def _mse_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    p = torch.randn(3, 7, 5, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(3, 7, 5, generator=g, dtype=dtype, requires_grad=True)
    return p, t, torch.tensor([[0, 7], [2, 5], [6, 6]])  # the last sample empty


@pytest.mark.parametrize("fn", ["wrapper", "raw"])
def test_double_backward(fn):
    p, t, r = _mse_inputs()
    r[2, 1] = 7  # no NaN loss here: gradgradcheck needs finite values
    f = {"wrapper": ops.masked_mse, "raw": OP.masked_mse}[fn]
    assert torch.autograd.gradgradcheck(lambda a, b: f(a, b, r), (p, t))
    # a second derivative taken by hand is the analytic one: d2/dp2 = 2/(count B) inside
    (gp,) = torch.autograd.grad(f(p, t, r), p, create_graph=True)
    (h,) = torch.autograd.grad(gp.sum(), p)
    assert h is not None
    torch.testing.assert_close(h[0], torch.full_like(h[0], 2 / (7 * 5 * 3)))


def test_forward_mode_on_the_wrapper_and_on_the_raw_op():
    p, t, r = _mse_inputs()
    r[2, 1] = 7
    dp, dt = torch.randn_like(p), torch.randn_like(t)
    _, tangent = torch.func.jvp(lambda a, b: ops.masked_mse(a, b, r), (p.detach(), t.detach()), (dp, dt))
    _, want = torch.func.jvp(lambda a, b: reference.masked_mse.masked_mse(a, b, r), (p.detach(), t.detach()), (dp, dt))
    torch.testing.assert_close(tangent, want)
    assert float(tangent) != 0
    # torch.autograd.forward_ad (no functorch transform: the old-style Function's jvp)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = ops.masked_mse(fwAD.make_dual(p.detach(), dp), fwAD.make_dual(t.detach(), dt), r)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want)
    g = torch.func.grad(lambda a: ops.masked_mse(a, t.detach(), r))(p.detach())
    (want_g,) = torch.autograd.grad(reference.masked_mse.masked_mse(p, t, r), p)
    torch.testing.assert_close(g, want_g)
    # the raw op: forward mode (torch.func and forward_ad) through the reference's math
    # (it once raised; silently zero tangents before that)
    _, raw = torch.func.jvp(lambda a, b: OP.masked_mse(a, b, r), (p.detach(), t.detach()), (dp, dt))
    torch.testing.assert_close(raw, want)
    _, want_p = torch.func.jvp(lambda a: reference.masked_mse.masked_mse(a, t.detach(), r), (p.detach(),), (dp,))
    with fwAD.dual_level():
        out = OP.masked_mse(fwAD.make_dual(p.detach(), dp), t.detach(), r)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want_p)
    g = torch.func.grad(lambda a: OP.masked_mse(a, t.detach(), r))(p.detach())
    torch.testing.assert_close(g, want_g)


def test_reference_backward_is_the_native_backward_bit_for_bit():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        p, t, r = _mse_inputs(dtype)
        for g in (torch.tensor(1.0), torch.tensor(2.5), torch.tensor(-0.3, dtype=torch.float64)):
            a = OP.masked_mse_backward(g, p.detach(), t.detach(), r)
            b = reference.masked_mse.masked_mse_backward(g, p.detach(), t.detach(), r)
            assert_bitwise_equal(a, b, f"{dtype} g={g}")


def test_get_batch_loss_edge_inputs_match_upstream():
    empty = torch.zeros(0, 4, 8)
    got = get_batch_loss(empty, empty)
    want = reference.upstream.train.get_batch_loss(empty, empty)
    assert got.dtype == want.dtype == torch.float32 and torch.isnan(got) and torch.isnan(want)
    p64, t64 = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 8, 4, dtype=torch.float64)
    assert get_batch_loss(p64, t64).dtype == torch.float32  # upstream casts to float first
    with pytest.raises(ValueError, match="T=0"):
        get_batch_loss(torch.zeros(1, 0, 4), torch.zeros(1, 0, 4), torch.zeros(1, 0, 2, 2))
    big = torch.randn(100_003)  # 1-D: once one row per element; now one sample
    torch.testing.assert_close(get_batch_loss(big, big * 0.5), torch.nn.functional.mse_loss(big, big * 0.5))


# ------------------------------------------------------------ update_ema findings


class _Opt:
    def __init__(self, m):
        self.map = {id(p): p.detach().float().clone() for p in m.parameters()}

    def get_working_to_master_map(self):
        return self.map


def _models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).bfloat16()
    ema = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).bfloat16()
    return model, ema, _Opt(model)


def _check_against_reference(model, ema, opt):
    ema_ref = type(ema)(*[torch.nn.Linear(1, 1) for _ in ema]) if False else None  # noqa
    import copy

    ema_ref = copy.deepcopy(ema)
    update_ema(ema, model, opt, decay=0.5)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.5)
    for (n, a), (_, b) in zip(ema.named_parameters(), ema_ref.named_parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), n)


def test_update_ema_sees_parameters_replaced_behind_the_hook():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    new = torch.nn.Parameter(torch.randn(3, 4).bfloat16())
    model[0]._parameters["weight"] = new  # no registration hook fires
    opt.map[id(new)] = torch.full((3, 4), 7.0)
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].weight.float() > 3).all())  # moved towards the new master (7)


def test_update_ema_after_del_bias_and_ema_param_replaced():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    del model[1].bias
    _check_against_reference(model, ema, opt)
    ema[0]._parameters["bias"] = torch.nn.Parameter(torch.zeros(3).bfloat16())
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].bias != 0).any())


def test_update_ema_sees_a_master_replaced_in_place_in_the_map():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    w = model[0].weight
    opt.map[id(w)] = torch.full((3, 4), -9.0)  # same dict, same length, new tensor
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].weight.float() < -3).all())
