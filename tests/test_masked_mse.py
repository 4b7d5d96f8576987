"""Masked per-sample MSE (get_batch_loss, masked_mse, loss_ranges): native op vs
the upstream port / the reference; the three-way contract; the CUDA bodies walked
over their grids on the CPU; a property-based differential suite; CUDA launch
paths (marked `cuda`: skipped without a GPU)."""

import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from contract import WAYS, Contract, assert_three_way, faked, raises, raw
from helpers import (
    DEVICES,
    FLOATS,
    assert_bitwise_equal,
    each_isa,
    free_cuda_bytes,
    inference_zeros,
    needs_native,
    skip_without_native,
    with_specials,
    z,
)
from hypothesis import event, given
from hypothesis import strategies as st

from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.reference import masked_mse as ref_mse
from opensora_fast.reference.masked_mse import MASK_DTYPES
from opensora_fast.utils.train import get_batch_loss, loss_token_ranges

# Only a declared pure-Python install skips; a build that silently failed must fail here.
pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
OP = torch.ops.opensora_fast

TOL = {  # grads: rounded to the input dtype, so one ulp of it
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-6, atol=1e-7),  # upstream computes in fp32 even here
    torch.bfloat16: dict(rtol=1e-2, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
# The loss is an fp32 result in every dtype (the inputs' values are exact in
# fp32); only the summation order differs from upstream's: ~1e-6 relative at most.
LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
DTYPES = list(TOL)


def make_masks(kind, B, T, H, W, gen):
    m = torch.zeros(B, T, H, W)
    for b in range(B):
        k = kind if kind != "mixed" else ["head", "tail", "loop", "v2v", "none"][b % 5]
        if k == "head":
            m[b, 0] = 1
        elif k == "tail":
            m[b, -1] = 1
        elif k == "loop":
            m[b, 0] = m[b, -1] = 1
        elif k == "v2v":
            m[b, : min(3, T)] = 1
        elif k == "random":
            m[b] = (torch.rand(T, generator=gen) < 0.4).float()[:, None, None]
    return m


def inputs(B, T, H, W, D, dtype, gen, patch=2):
    L = T * (H // patch) * (W // patch)
    p = torch.randn(B, L, D, generator=gen).to(dtype).requires_grad_()
    t = torch.randn(B, L, D, generator=gen).to(dtype).requires_grad_()
    return p, t


def loss_and_grads(fn, p, t, g=2.5):
    loss = fn(p, t)
    gp, gt = torch.autograd.grad(loss * g, [p, t])
    return loss.detach(), gp, gt


SHAPES = [  # B, T, H, W, D
    (4, 5, 6, 8, 64),
    (1, 2, 4, 4, 16),
    (3, 1, 2, 6, 12),  # T = 1
    (2, 7, 10, 6, 68),  # odd latent sizes, unusual D
    (5, 3, 2, 2, 4),  # one token per frame
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["head", "tail", "loop", "v2v", "none", "mixed", "random", None])
def test_parity_with_upstream(dtype, shape, kind):
    B, T, H, W, D = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))
    p, t = inputs(B, T, H, W, D, dtype, gen)
    masks = make_masks(kind, B, T, H, W, gen) if kind else None
    want = loss_and_grads(lambda a, b: reference.upstream.train.get_batch_loss(a, b, masks), p, t)
    got = loss_and_grads(lambda a, b: get_batch_loss(a, b, masks), p, t)
    assert got[0].dtype == torch.float32  # as upstream, which casts to float first (fp64 too)
    if torch.isnan(want[0]):  # a sample with no frame left: NaN, as upstream
        assert torch.isnan(got[0])
    else:
        torch.testing.assert_close(got[0], want[0].to(got[0].dtype), **LOSS_TOL)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_unmasked_matches_mse_loss_any_shape():
    # equal up to summation order (both fp32), not bit for bit
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 100, 64), (2, 3, 5, 7), (6,)]:
        p, t = torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16()
        torch.testing.assert_close(get_batch_loss(p, t), F.mse_loss(p.float(), t.float()), rtol=1e-5, atol=0)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    ranges = torch.tensor([[0, 7], [2, 5], [6, 7]])
    assert torch.autograd.gradcheck(lambda a, b: ops.masked_mse(a, b, ranges), (p, t))


def test_native_equals_reference_op_including_clamped_ranges():
    gen = torch.Generator().manual_seed(2)
    B, L, D = 6, 9000, 7  # several chunks per sample
    p = torch.randn(B, L, D, generator=gen, requires_grad=True)
    t = torch.randn(B, L, D, generator=gen, requires_grad=True)
    ranges = torch.tensor([[0, L], [-5, 3], [4000, 20000], [10, 5], [L, L + 3], [1, 8999]])
    got = loss_and_grads(lambda a, b: ops.masked_mse(a, b, ranges), p, t)
    want = loss_and_grads(lambda a, b: reference.masked_mse.masked_mse(a, b, ranges), p, t)
    assert torch.isnan(got[0]) and torch.isnan(want[0])  # samples 3 and 4 are empty
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b)
    ok = torch.tensor([[0, L], [-5, 3], [4000, 20000], [1, 8999]])
    a = ops.masked_mse(p[[0, 1, 2, 5]].detach(), t[[0, 1, 2, 5]].detach(), ok)
    b = reference.masked_mse.masked_mse(p[[0, 1, 2, 5]].detach(), t[[0, 1, 2, 5]].detach(), ok)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_deterministic_across_thread_counts():
    # The same bits whatever torch's thread count: the loss (partials in chunk
    # order), the gradient, and the unmasked loss (one sample of N elements).
    gen = torch.Generator().manual_seed(3)
    p, t = torch.randn(4, 20000, 64, generator=gen), torch.randn(4, 20000, 64, generator=gen)
    r = torch.tensor([[0, 20000], [100, 19000], [5, 6], [0, 1]])
    g = torch.tensor(1.5)

    def run():
        return (ops.masked_mse(p, t, r), torch.ops.opensora_fast.masked_mse_backward(g, p, t, r), get_batch_loss(p, t))

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_empty_sample_gives_nan_loss_and_zero_grads_there():
    gen = torch.Generator().manual_seed(4)
    p, t = inputs(2, 1, 4, 4, 8, torch.float32, gen)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0] = 1  # T=1 and its only frame is conditioned: nothing left
    loss = get_batch_loss(p, t, masks)
    assert torch.isnan(loss)
    assert torch.isnan(reference.upstream.train.get_batch_loss(p, t, masks))
    (gp,) = torch.autograd.grad(loss, [p])
    assert torch.all(gp[0] == 0) and torch.isfinite(gp).all()
    # the other sample's gradient is what it would be with the empty sample counted in B
    torch.testing.assert_close(gp[1], 2 * (p[1] - t[1]).detach() / (p[1].numel() * 2))


def test_five_dim_masks_and_patch_size_one():
    gen = torch.Generator().manual_seed(5)
    B, T, H, W, D = 3, 4, 4, 6, 10
    p, t = inputs(B, T, H, W, D, torch.float32, gen)
    m = make_masks("mixed", B, T, H, W, gen)
    torch.testing.assert_close(get_batch_loss(p, t, m[:, None]), get_batch_loss(p, t, m))
    # patch 1 (DC-AE): H*W tokens per frame
    p1, t1 = inputs(B, T, H, W, D, torch.float32, gen, patch=1)
    got = get_batch_loss(p1, t1, m, patch_size=1)
    hw = H * W
    want = []
    for b, (s, e) in enumerate([(1, T), (0, T - 1), (1, T - 1), (0, T), (0, T)][:B]):
        want.append(F.mse_loss(p1[b, s * hw : e * hw], t1[b, s * hw : e * hw]))
    torch.testing.assert_close(got, torch.stack(want).mean())


def test_exclude_conditioned_drops_v2v_prefix():
    gen = torch.Generator().manual_seed(6)
    B, T, H, W, D = 2, 6, 4, 4, 8
    p, t = inputs(B, T, H, W, D, torch.float32, gen)
    m = torch.zeros(B, T, H, W)
    m[0, :3] = 1  # v2v head: 3 frames
    m[1, 0] = m[1, -2:] = 1  # head frame and a 2-frame tail
    hw = 4
    up = get_batch_loss(p, t, m)  # upstream keeps all frames of both samples
    full = F.mse_loss(p, t)
    torch.testing.assert_close(up, full)
    got = get_batch_loss(p, t, m, exclude="conditioned")
    want = (F.mse_loss(p[0, 3 * hw :], t[0, 3 * hw :]) + F.mse_loss(p[1, hw : 4 * hw], t[1, hw : 4 * hw])) / 2
    torch.testing.assert_close(got, want)
    r = loss_token_ranges(m, exclude="conditioned")
    assert r.tolist() == [[3 * hw, 6 * hw], [hw, 4 * hw]]


def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    p = torch.randn(3, 50, 6, generator=gen, requires_grad=True)
    t = torch.randn(3, 50, 6, generator=gen, requires_grad=True)
    r = torch.tensor([[0, 50], [3, 40], [10, 11]])
    torch.library.opcheck(torch.ops.opensora_fast.masked_mse.default, (p, t, r))
    g = torch.tensor(1.5)
    torch.library.opcheck(torch.ops.opensora_fast.masked_mse_backward.default, (g, p.detach(), t.detach(), r))
    frame = (torch.rand(4, 7, 3, generator=gen) < 0.5).float()[:, :, 1]
    for upstream in (True, False):
        torch.library.opcheck(torch.ops.opensora_fast.loss_ranges.default, (frame, 12, upstream))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(8)
    B, T, H, W, D = 2, 3, 4, 4, 8
    p, t = inputs(B, T, H, W, D, torch.float32, gen)
    m = make_masks("mixed", B, T, H, W, gen)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b, masks):
        return get_batch_loss(a, b, masks) * 2

    got = loss_and_grads(lambda a, b: step(a, b, m), p, t)
    want = loss_and_grads(lambda a, b: get_batch_loss(a, b, m) * 2, p, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_reference_backend_matches_native(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    p, t = inputs(3, 4, 4, 4, 8, torch.bfloat16, gen)
    m = make_masks("mixed", 3, 4, 4, 4, gen)
    got = loss_and_grads(lambda a, b: get_batch_loss(a, b, m), p, t)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    want = loss_and_grads(lambda a, b: get_batch_loss(a, b, m), p, t)
    torch.testing.assert_close(got[0], want[0], **LOSS_TOL)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_inputs(backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    p = torch.zeros(2, 12, 4)
    m = torch.zeros(2, 3, 4, 4)  # 3 * 2 * 2 = 12 tokens with patch 2
    r2 = torch.tensor([[0, 12], [0, 12]])
    cases = [
        (lambda: get_batch_loss(p, torch.zeros(2, 12, 5)), ValueError, "v_t has shape"),
        (lambda: get_batch_loss(p, p.bfloat16()), TypeError, "v_t has dtype"),
        (lambda: get_batch_loss(p, torch.zeros(2, 12, 4, device="meta")), ValueError, "v_t is on meta"),
        (lambda: get_batch_loss(p, p, torch.zeros(2, 4, 4, 4)), ValueError, "model_pred has L=12"),
        (lambda: get_batch_loss(p, p, torch.zeros(2, 3, 5, 4)), ValueError, "does not divide"),
        (lambda: get_batch_loss(p, p, torch.zeros(2, 3, 4)), ValueError, "masks must be [B, T, H, W]"),
        (lambda: get_batch_loss(p, p, torch.zeros(2, 2, 3, 4, 4)), ValueError, "[B, 1, T, H, W]"),
        (lambda: get_batch_loss(p, p, torch.zeros(3, 3, 4, 4)), ValueError, "masks has batch 3"),
        (lambda: get_batch_loss(p, p, m, exclude="all"), ValueError, "exclude must be one of"),
        (lambda: get_batch_loss(p, p, m, patch_size=0), ValueError, "patch_size must be a positive int"),
        (lambda: get_batch_loss(p[0], p[0], m), ValueError, "must be packed [B, L, D]"),
        (lambda: ops.masked_mse(p, p, torch.zeros(2, 2)), TypeError, "ranges must be int64"),
        (lambda: ops.masked_mse(p, p, torch.zeros(3, 2, dtype=torch.long)), ValueError, "ranges must be [B, 2]"),
        (lambda: ops.masked_mse(p.int(), p.int(), torch.zeros(2, 2, dtype=torch.long)), TypeError, "pred has dtype"),
        # once "target has shape [0]" (native) and a schema RuntimeError for a list
        (lambda: ops.masked_mse(p, None, r2), TypeError, "masked_mse: target must be a tensor, got NoneType"),
        (lambda: ops.masked_mse(None, p, r2), TypeError, "masked_mse: pred must be a tensor, got NoneType"),
        (lambda: ops.masked_mse(p, p, [[0, 12], [0, 12]]), TypeError, "masked_mse: ranges must be a tensor, got list"),
        (lambda: ops.masked_mse(p.to_sparse(), p, r2), ValueError, "pred, target and ranges must be dense"),
        (lambda: ops.loss_ranges(None, 4), TypeError, "loss_ranges: frame_mask must be a tensor, got NoneType"),
        (lambda: ops.loss_ranges([[0, 1]], 4), TypeError, "loss_ranges: frame_mask must be a tensor, got list"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))


# ---- the contract: one table of bad inputs per op, three ways ------------------------


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
            inference_zeros(4).view(2, 2),
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


MSE_OP = Contract(
    {"native": raw("masked_mse"), "reference": reference.masked_mse.masked_mse, "fake": faked(raw("masked_mse"))}
)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(MSE))
def test_masked_mse_check_contract(name, way):
    _, _, _, exc, text = MSE[name]
    assert_three_way(MSE_OP, way, lambda: _mse_cases()[name][:3], exc, text)


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
            raises(lambda: fn(x, x, r), ValueError, dense)
    for fn in (OP.masked_mse_backward, reference.masked_mse.masked_mse_backward):
        raises(lambda: fn(torch.tensor(1.0), nt, nt, r), ValueError, dense)
    frame = torch.nested.nested_tensor([z(3), z(3)])
    for fn in (
        lambda: OP.loss_ranges(frame, 4, True),
        lambda: reference.masked_mse.loss_ranges(frame, 4, True),
        lambda: ops.loss_ranges(frame, 4),
    ):
        raises(fn, ValueError, "loss_ranges: frame_mask must be a dense (strided) tensor")


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


def _loss_ranges_upstream(fn):
    return lambda frame, hw: fn(frame, hw, True)


RANGES_OP = Contract(
    {
        "native": _loss_ranges_upstream(raw("loss_ranges")),
        "reference": _loss_ranges_upstream(reference.masked_mse.loss_ranges),
        "fake": faked(_loss_ranges_upstream(raw("loss_ranges"))),
    }
)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", list(_ranges_cases()))
def test_loss_ranges_check_contract(name, way):
    _, _, exc, text = _ranges_cases()[name]
    assert_three_way(RANGES_OP, way, lambda: _ranges_cases()[name][:2], exc, text)


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


BACKWARD_OP = Contract(
    {
        "native": raw("masked_mse_backward"),
        "walk": raw("_masked_mse_grid_walk"),  # segfaulted on a wrong grad shape
        "reference": reference.masked_mse.masked_mse_backward,
        "fake": faked(raw("masked_mse_backward")),
    }
)


@pytest.mark.parametrize("way", ["native", "walk", "reference", "fake"])
@pytest.mark.parametrize("name", list(_grad_cases()))
def test_masked_mse_backward_check_contract(name, way):
    grad, exc, text = _grad_cases()[name]
    p, t, r = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.tensor([[0, 5], [1, 3]])
    assert_three_way(BACKWARD_OP, way, lambda: (grad, p, t, r), exc, text)  # the same line from the other ways


# ---- findings of the hardening review (each failed before its fix) ------------------


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


def _python_calls(fn) -> list:
    """Names of the opensora_fast Python functions that run inside ``fn()``."""
    seen = []

    def profile(frame, event, arg):
        if event == "call" and "opensora_fast" in frame.f_code.co_filename:
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_eager_loss_runs_its_autograd_in_cpp():
    # A plain eager call is one dispatcher call: the raw op's autograd Function is
    # C++ (masked_mse_autograd.cpp), forward and backward, no Python on the way
    # (it was a Python autograd kernel and Function, ~10 us of host time per call).
    p, t, r = _mse_inputs(torch.float32)
    r[2, 1] = 7
    out = {}

    def raw_step():
        out["loss"] = OP.masked_mse(p, t, r)
        out["grads"] = torch.autograd.grad(out["loss"], (p, t))

    assert _python_calls(raw_step) == []
    gp, gt = out["grads"]
    assert torch.equal(gp, OP.masked_mse_backward(torch.tensor(1.0), p.detach(), t.detach(), r))
    assert torch.equal(gt, -gp)
    assert torch.equal(out["loss"], OP.masked_mse(p.detach(), t.detach(), r))
    # the drop-in: Python for its argument checks only, nothing in the backward
    for masks in (None, torch.zeros(3, 7, 2, 2)):
        loss = get_batch_loss(p, t, masks, patch_size=2) if masks is not None else get_batch_loss(p, t)
        assert _python_calls(lambda: torch.autograd.grad(loss, (p, t))) == []
    names = _python_calls(lambda: get_batch_loss(p, t))
    assert not {"apply", "forward", "setup_context", "save"} & set(names), names


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


WALK_CASES = [  # B, L, D, ranges
    (3, 3000, 7, [[0, 3000], [5, 2999], [1, 1]]),  # odd D: chunks start misaligned; an empty sample
    (2, 700, 64, [[0, 700], [100, 650]]),  # aligned 16-byte path, several chunks
    (2, 700, 64, [[0, 250], [300, 700]]),  # whole chunks outside the ranges (zero stores only)
    (2, 1024, 33, [[0, 1024], [600, 601]]),  # whole chunks inside, misaligned; a one-token range
    (1, 5, 3, [[-4, 99]]),  # clamped
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WALK_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_grid_walk_matches_cpu_kernel_and_reference(dtype, case):
    # The CUDA kernels' per-thread bodies over their whole grids on the CPU, with
    # the block reduction in the GPU's order.
    B, L, D, r = case
    gen = torch.Generator().manual_seed(B * L + D)
    p = torch.randn(B, L, D, generator=gen).to(dtype)
    t = torch.randn(B, L, D, generator=gen).to(dtype)
    ranges = torch.tensor(r)
    g = torch.tensor(0.75)
    loss, grad = torch.ops.opensora_fast._masked_mse_grid_walk(g, p, t, ranges)
    cpu_loss = torch.ops.opensora_fast.masked_mse(p, t, ranges)
    cpu_grad = torch.ops.opensora_fast.masked_mse_backward(g, p, t, ranges)
    assert torch.equal(grad, cpu_grad)  # elementwise: same formula, bit for bit
    ref = reference.masked_mse.masked_mse(p, t, ranges)
    for x in (loss, cpu_loss):
        if torch.isnan(ref):
            assert torch.isnan(x)
        else:
            torch.testing.assert_close(x, ref, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grid_walk_result_independent_of_byte_offset_0_to_15(dtype):
    # The CUDA review's finding: the summation order once followed pointer
    # alignment. Every storage offset a 16-byte vector can see gives the same bits.
    gen = torch.Generator().manual_seed(21)
    B, L, D = 2, 41, 37
    p, t = torch.randn(B, L, D, generator=gen).to(dtype), torch.randn(B, L, D, generator=gen).to(dtype)
    ranges, g = torch.tensor([[3, 40], [0, 41]]), torch.tensor(1.5)
    base = torch.ops.opensora_fast._masked_mse_grid_walk(g, p, t, ranges)
    esz = p.element_size()
    for off_bytes in range(0, 16, esz):
        off = off_bytes // esz
        bp, bt = torch.empty(p.numel() + 16, dtype=dtype), torch.empty(t.numel() + 16, dtype=dtype)
        vp, vt = bp[off : off + p.numel()].view(B, L, D), bt[(off * 3) % 8 : (off * 3) % 8 + t.numel()].view(B, L, D)
        vp.copy_(p)
        vt.copy_(t)
        got = torch.ops.opensora_fast._masked_mse_grid_walk(g, vp, vt, ranges)
        assert torch.equal(
            got[0].view(torch.int64 if dtype == torch.float64 else torch.int32),
            base[0].view(torch.int64 if dtype == torch.float64 else torch.int32),
        ), off_bytes
        assert torch.equal(got[1], base[1]), off_bytes


def test_grid_walk_with_70000_samples():
    # Samples and chunks share one grid dimension: any batch size launches.
    gen = torch.Generator().manual_seed(4)
    p, t = torch.randn(70_000, 2, 1, generator=gen), torch.randn(70_000, 2, 1, generator=gen)
    ranges = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 2]]).repeat(17_500, 1)
    loss, grad = torch.ops.opensora_fast._masked_mse_grid_walk(torch.tensor(1.0), p, t, ranges)
    assert torch.isnan(loss)  # a quarter of the samples are empty: NaN, as upstream
    ranges[3::4, 0] = 1
    loss, grad = torch.ops.opensora_fast._masked_mse_grid_walk(torch.tensor(1.0), p, t, ranges)
    # 70,000 sample means added in order in fp32 (the CPU's order): ~1e-5 relative
    torch.testing.assert_close(loss, reference.masked_mse.masked_mse(p, t, ranges), rtol=1e-4, atol=0)
    assert torch.equal(grad, torch.ops.opensora_fast.masked_mse_backward(torch.tensor(1.0), p, t, ranges))


# ---- loss_ranges: get_batch_loss's token ranges in one launch --------------------------

RANGE_DTYPES = [  # every dtype the check promises (the uint16/32/64 and float8 kernels once missing)
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.bool,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def test_range_dtypes_are_the_promised_ones():
    assert set(RANGE_DTYPES) == MASK_DTYPES


@pytest.mark.parametrize("dtype", RANGE_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_loss_ranges_native_equals_reference(dtype, T):
    gen = torch.Generator().manual_seed(T)
    kinds = ["head", "tail", "loop", "v2v", "none", "random", "random", "random"]
    m = torch.stack([make_masks(k, 1, T, 3, 4, gen)[0] for k in kinds] + [torch.ones(T, 3, 4)])
    if dtype.is_floating_point:
        m[5, :, 0, 0] = torch.where(m[5, :, 0, 0] == 1, torch.tensor(float("nan")), m[5, :, 0, 0])  # NaN != 1
        m[6, :, 0, 0] *= 2  # 2 is not conditioned
    m = m.to(dtype)
    for frame in (m[:, :, 0, 0], m[:, :, 0, 0].contiguous(), m.unsqueeze(1)[:, 0, :, 0, 0], m[:0, :, 0, 0]):
        for upstream in (True, False):
            for hw in (0, 1, 6):
                got = ops.loss_ranges(frame, hw, upstream)
                want = reference.masked_mse.loss_ranges(frame, hw, upstream)
                assert got.dtype == torch.int64 and torch.equal(got, want), (dtype, T, upstream, hw)
                assert bool((got[:, 1] >= got[:, 0]).all())


def test_loss_ranges_rules_by_hand():
    one = lambda *frames: torch.tensor([list(frames)], dtype=torch.float32)  # noqa: E731
    # upstream: drop an end frame only when no interior frame is conditioned
    assert ops.loss_ranges(one(1, 0, 0, 1), 10).tolist() == [[10, 30]]
    assert ops.loss_ranges(one(1, 1, 0, 0), 10).tolist() == [[0, 40]]  # v2v keeps every frame
    assert ops.loss_ranges(one(1), 10).tolist() == [[10, 10]]  # T=1 conditioned: nothing left
    # conditioned: the leading and trailing runs go
    assert ops.loss_ranges(one(1, 1, 0, 0), 10, upstream=False).tolist() == [[20, 40]]
    assert ops.loss_ranges(one(1, 1, 1, 1), 10, upstream=False).tolist() == [[40, 40]]
    assert ops.loss_ranges(one(0, 1, 0, 1), 10, upstream=False).tolist() == [[0, 30]]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_loss_ranges_hw_limits(backend, monkeypatch):
    # T * hw must be an int64 (it once wrapped silently on both backends); an hw
    # beyond int64 is refused by the wrapper as the reference refuses it (it
    # once met the schema parser's RuntimeError natively).
    import numpy as np

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    frame = torch.tensor([[0.0, 0.0, 1.0]])  # T = 3, the last frame dropped: [0, 2 * hw)
    big = (2**63 - 1) // 3
    assert ops.loss_ranges(frame, big).tolist() == [[0, 2 * big]]
    assert ops.loss_ranges(torch.zeros(1, 1), 2**63 - 1).tolist() == [[0, 2**63 - 1]]
    assert ops.loss_ranges(frame, np.int64(5)).tolist() == [[0, 10]]
    for hw in (big + 1, 2**62, 2**63 - 1, 2**63, 2**64 + 5):
        with pytest.raises(ValueError) as info:
            ops.loss_ranges(frame, hw)
        assert str(info.value) == f"loss_ranges: T * hw = 3 * {hw} does not fit in int64"
    for hw in (-1, -(2**63) - 1):
        with pytest.raises(ValueError, match=f"loss_ranges: hw must be >= 0, got {hw}"):
            ops.loss_ranges(frame, hw)
    for hw, name in ((4.0, "float"), (True, "bool"), ("4", "str"), (None, "NoneType")):
        with pytest.raises(TypeError) as info:
            ops.loss_ranges(frame, hw)
        assert str(info.value) == f"loss_ranges: hw must be an int, got {name}"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_unmasked_loss_after_inference_mode_or_a_fake_trace(backend, monkeypatch):
    # The unmasked path caches its [[0, N]] ranges per size: a validation loss
    # under inference_mode once cached an inference tensor, and every later
    # training step of that size failed in backward; a FakeTensorMode trace
    # cached a FakeTensor, and real calls failed.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    import opensora_fast.utils._loss as train

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    monkeypatch.setattr(train, "_whole_ranges", {})
    gen = torch.Generator().manual_seed(11)
    p, t = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 7, 5, generator=gen)
    with torch.inference_mode():
        val = get_batch_loss(p, t)
    assert not any(v.is_inference() for v in train._whole_ranges.values())
    pg = p.clone().requires_grad_()
    loss = get_batch_loss(pg, t)
    loss.backward()
    torch.testing.assert_close(loss.detach(), val, rtol=0, atol=0)
    torch.testing.assert_close(pg.grad, 2 * (p - t) / p.numel())

    p2, t2 = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    with FakeTensorMode() as mode:
        fake = get_batch_loss(mode.from_tensor(p2), mode.from_tensor(t2))
    assert isinstance(fake, FakeTensor)
    assert all(type(v) is torch.Tensor for v in train._whole_ranges.values())
    real = get_batch_loss(p2, t2)
    assert type(real) is torch.Tensor
    torch.testing.assert_close(real, F.mse_loss(p2, t2), **LOSS_TOL)
    with FakeTensorMode() as mode:  # and a trace after real calls: no real tensor leaks into it
        assert isinstance(get_batch_loss(mode.from_tensor(p2), mode.from_tensor(t2)), FakeTensor)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_inference_mode_target_and_ranges_with_a_pred_that_requires_grad(backend, monkeypatch):
    # Autograd cannot save an inference tensor: the native Function once failed
    # where the reference (and upstream, which casts to float first) ran.
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    gen = torch.Generator().manual_seed(12)
    p = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t0 = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        t = t0.clone()
        r = ops.loss_ranges(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 2)
    loss = ops.masked_mse(p, t, r)
    with torch.inference_mode():
        t.add_(1.0)  # changed after the forward: the gradient is still of the forward's t
    (gp,) = torch.autograd.grad(loss, p, create_graph=True)
    (h,) = torch.autograd.grad(gp.sum(), p)  # second order too
    want = reference.masked_mse.masked_mse(p, t0, r.clone())
    (want_gp,) = torch.autograd.grad(want, p, create_graph=True)
    (want_h,) = torch.autograd.grad(want_gp.sum(), p)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gp, want_gp)
    torch.testing.assert_close(h, want_h)
    with torch.inference_mode():
        tb = t0.bfloat16()
    pb = p.detach().bfloat16().requires_grad_()
    masks = torch.zeros(2, 3, 4, 2)
    masks[0, 0] = 1
    for m in (None, masks):
        get_batch_loss(pb, tb, m).backward()
        assert pb.grad is not None and torch.isfinite(pb.grad).all()
        pb.grad = None


def _vmap_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(13)
    N, B, L, D = 3, 2, 7, 5
    pb = torch.randn(N, B, L, D, generator=gen, dtype=dtype)
    tb = torch.randn(N, B, L, D, generator=gen, dtype=dtype)
    r = torch.tensor([[0, 7], [2, 5]])
    rb = torch.tensor([[[0, 7], [2, 5]], [[1, 6], [0, 7]], [[3, 4], [0, 2]]])
    return pb, tb, r, rb


@pytest.mark.parametrize("fn", ["wrapper", "raw"])
def test_vmap_matches_the_reference(fn):
    # The native op had no vmap rule (torch.func.vmap raised); now each example
    # runs the native kernels.
    f = {"wrapper": ops.masked_mse, "raw": torch.ops.opensora_fast.masked_mse}[fn]
    pb, tb, r, rb = _vmap_inputs()
    vmap = torch.func.vmap
    want = torch.stack([reference.masked_mse.masked_mse(pb[i], tb[i], r) for i in range(3)])
    torch.testing.assert_close(vmap(lambda a, b: f(a, b, r))(pb, tb), want)
    torch.testing.assert_close(vmap(lambda a, b: f(a, b, r), in_dims=(2, 2))(pb.movedim(0, 2), tb.movedim(0, 2)), want)
    want_shared = torch.stack([reference.masked_mse.masked_mse(pb[i], tb[0], r) for i in range(3)])
    torch.testing.assert_close(vmap(lambda a: f(a, tb[0], r))(pb), want_shared)
    want_rb = torch.stack([reference.masked_mse.masked_mse(pb[i], tb[i], rb[i]) for i in range(3)])
    torch.testing.assert_close(vmap(f)(pb, tb, rb), want_rb)
    # per-example gradients: vmap over torch.func.grad
    got = vmap(torch.func.grad(lambda a, b: f(a, b, r)))(pb, tb)
    ref = vmap(torch.func.grad(lambda a, b: reference.masked_mse.masked_mse(a, b, r)))(pb, tb)
    torch.testing.assert_close(got, ref)


def test_vmap_of_the_backward_and_loss_ranges_ops():
    pb, tb, r, _ = _vmap_inputs()
    gs = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = torch.func.vmap(lambda g, a, b: torch.ops.opensora_fast.masked_mse_backward(g, a, b, r))(gs, pb, tb)
    for i in range(3):
        assert torch.equal(got[i], reference.masked_mse.masked_mse_backward(gs[i], pb[i], tb[i], r))
    gen = torch.Generator().manual_seed(14)
    mb = (torch.rand(4, 3, 5, generator=gen) < 0.5).float()  # [N, B, T]
    for upstream in (True, False):
        got = torch.func.vmap(lambda m: ops.loss_ranges(m, 6, upstream))(mb)
        assert torch.equal(got, torch.stack([reference.masked_mse.loss_ranges(m, 6, upstream) for m in mb]))


def test_forward_over_reverse_and_hessian_match_the_reference():
    # jvp of grad once raised natively (the backward Function had no jvp).
    gen = torch.Generator().manual_seed(15)
    p = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    v, w = torch.randn_like(p), torch.randn_like(t)
    r = torch.tensor([[0, 5], [1, 3]])
    for f in (ops.masked_mse, torch.ops.opensora_fast.masked_mse):
        got = torch.func.jvp(torch.func.grad(lambda a, b: f(a, b, r), argnums=(0, 1)), (p, t), (v, w))
        want = torch.func.jvp(
            torch.func.grad(lambda a, b: reference.masked_mse.masked_mse(a, b, r), argnums=(0, 1)), (p, t), (v, w)
        )
        torch.testing.assert_close(got, want)
        assert float(got[1][0].abs().sum()) != 0
    got = torch.func.hessian(lambda a: ops.masked_mse(a, t, r))(p)
    want = torch.func.hessian(lambda a: reference.masked_mse.masked_mse(a, t, r))(p)
    torch.testing.assert_close(got, want)
    got = torch.func.jacfwd(torch.func.jacrev(lambda a: ops.masked_mse(a, t, r)))(p)
    torch.testing.assert_close(got, want)
    # forward over reverse through torch.autograd.forward_ad as well
    import torch.autograd.forward_ad as fwAD

    pg = p.clone().requires_grad_()
    with fwAD.dual_level():
        dual = fwAD.make_dual(pg, v)
        (g,) = torch.autograd.grad(ops.masked_mse(dual, t, r), dual, create_graph=True)
        tangent = fwAD.unpack_dual(g).tangent
    want_t = torch.func.jvp(torch.func.grad(lambda a: reference.masked_mse.masked_mse(a, t, r)), (p,), (v,))[1]
    torch.testing.assert_close(tangent, want_t)


# ---- property-based: native (and the walked CUDA bodies) vs reference -------------
# (profile "ci": fixed and bounded; --hypothesis-profile=long explores further)


def _token_range(draw, L: int) -> tuple[int, int]:
    """[start, end) for one sample: mostly non-empty, sometimes reaching past
    [0, L) (the op clamps), about one in ten empty (NaN for that sample)."""
    if L == 0 or draw(st.integers(0, 9)) == 5:  # not 0: hypothesis favours the bounds
        s = draw(st.integers(-3, L + 3))
        return s, draw(st.integers(-3, min(s, L + 3)))
    s = draw(st.integers(0, L - 1))
    e = draw(st.integers(s + 1, L))
    if draw(st.integers(0, 3)) == 0:
        s, e = s - draw(st.integers(0, 3)), e + draw(st.integers(0, 3))
    return s, e


@st.composite
def mse_calls(draw):
    v = draw(st.integers(0, 19))
    B = 0 if v == 10 else 1 + v % 4  # B = 0 (a NaN loss) about once in twenty
    L, D = draw(st.integers(0, 40)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, L, D, generator=g).to(dtype)
    t = torch.randn(B, L, D, generator=g).to(dtype)
    ranges = torch.tensor([_token_range(draw, L) for _ in range(B)], dtype=torch.int64).reshape(B, 2)
    for b in range(B):  # NaN/Inf just outside a sample's range, in pred or target
        s = max(0, min(L, int(ranges[b, 0])))
        e = max(s, min(L, int(ranges[b, 1])))
        outside = ([s - 1] if s > 0 else []) + ([e] if e < L else [])
        if outside and draw(st.booleans()):
            x = draw(st.sampled_from([p, t]))
            bad = draw(st.sampled_from([float("nan"), float("inf")]))
            x[b, draw(st.sampled_from(outside)), draw(st.integers(0, D - 1))] = bad
    empty = int((ranges[:, 1].clamp(0, L) <= ranges[:, 0].clamp(0, L)).sum())
    event(f"mse: B={'0' if B == 0 else '>0'}, L={'0' if L == 0 else '>0'}")
    if empty:
        event("mse: an empty sample")
    if B > empty:
        event("mse: a non-empty sample")
    return p, t, ranges


@given(
    st.integers(0, 5),
    st.integers(1, 9),
    st.integers(0, 7),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.bool, torch.int32]),
    st.booleans(),
    st.integers(0, 2**31),
    st.integers(1, 3),
)
def test_loss_ranges_property_native_equals_reference(B, T, hw, dtype, upstream, seed, step):
    # values from {0, 1, 2, NaN}: only 1 is a conditioned frame; a strided view
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan")])[torch.randint(0, 5, (B, T * step), generator=g)]
    if not dtype.is_floating_point:
        vals = torch.nan_to_num(vals, nan=3.0)
    frame = vals.to(dtype)[:, ::step]
    assert torch.equal(OP.loss_ranges(frame, hw, upstream), reference.masked_mse.loss_ranges(frame, hw, upstream))


def _mse_tol(dtype: torch.dtype) -> dict:
    # fp32 accumulation whatever the input dtype: the backends differ by summation order only
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _assert_loss_close(got: torch.Tensor, want: torch.Tensor, empty: bool, tol: dict, msg: str) -> None:
    """NaN exactly where the sample (or batch) is empty; else finite and close."""
    assert bool(want.isnan()) == empty and bool(got.isnan()) == empty, (msg, got, want)
    if not empty:
        assert bool(got.isfinite()), (msg, got)
        torch.testing.assert_close(got, want, msg=msg, **tol)


@given(mse_calls(), st.sampled_from([1.0, 2.5, -0.75]))
def test_masked_mse_native_equals_reference(call, gscale):
    p, t, ranges = call
    B, L, _ = p.shape
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    tol = _mse_tol(p.dtype)
    empty = [bool(min(L, max(0, int(e))) <= min(L, max(0, int(s)))) for s, e in ranges.tolist()]
    loss = OP.masked_mse(p, t, ranges)
    want = reference.masked_mse.masked_mse(p, t, ranges)
    assert loss.dtype == want.dtype == acc
    _assert_loss_close(loss, want, B == 0 or any(empty), tol, "mean")
    # each sample on its own: one empty sample's NaN would hide the others in the mean
    for b in range(B):
        one = (p[b : b + 1], t[b : b + 1], ranges[b : b + 1])
        _assert_loss_close(OP.masked_mse(*one), reference.masked_mse.masked_mse(*one), empty[b], tol, f"sample {b}")
        walked = OP._masked_mse_grid_walk(torch.tensor(1.0), *one)[0]
        _assert_loss_close(walked, reference.masked_mse.masked_mse(*one), empty[b], tol, f"walk {b}")
    g = torch.tensor(gscale)
    # the gradient is elementwise with the same roundings: bit for bit
    assert_bitwise_equal(
        OP.masked_mse_backward(g, p, t, ranges), reference.masked_mse.masked_mse_backward(g, p, t, ranges)
    )
    wl, wg = OP._masked_mse_grid_walk(g, p, t, ranges)
    _assert_loss_close(wl, want, B == 0 or any(empty), tol, "walk")
    assert_bitwise_equal(wg, OP.masked_mse_backward(g, p, t, ranges))


@given(st.integers(0, 15), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(0, 2**31))
def test_loss_grid_walk_independent_of_storage_offset(offset_bytes, dtype, seed):
    """The GPU's per-thread split follows element indices, not addresses: a view
    at any byte offset sums exactly like an aligned copy."""
    g = torch.Generator().manual_seed(seed)
    B, L, D = 2, 37, 33
    p, t = torch.randn(B, L, D, generator=g).to(dtype), torch.randn(B, L, D, generator=g).to(dtype)
    ranges = torch.tensor([[1, 30], [0, 37]])
    esz = p.element_size()
    off = offset_bytes // esz

    def at(x):
        buf = torch.empty(x.numel() + 16, dtype=dtype)
        v = buf[off : off + x.numel()].view(x.shape)
        v.copy_(x)
        return v

    one = torch.tensor(1.0)
    a = OP._masked_mse_grid_walk(one, p, t, ranges)
    b = OP._masked_mse_grid_walk(one, at(p), at(t), ranges)
    assert_bitwise_equal(a[0], b[0])
    assert_bitwise_equal(a[1], b[1])


@st.composite
def batches_with_masks(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    H, W, D = 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3)), draw(st.sampled_from([4, 12, 64]))
    frames = torch.tensor([[draw(st.booleans()) for _ in range(T)] for _ in range(B)], dtype=torch.float32)
    masks = frames[:, :, None, None].expand(B, T, H, W).contiguous()
    L = T * (H // 2) * (W // 2)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return torch.randn(B, L, D, generator=g).to(dtype), torch.randn(B, L, D, generator=g).to(dtype), masks


@given(batches_with_masks())
def test_masked_loss_matches_upstream_formula(batch):
    p, t, masks = batch
    tol = _mse_tol(p.dtype)  # both accumulate in fp32 (upstream calls .float() first)
    got = get_batch_loss(p, t, masks)
    want = reference.upstream.train.get_batch_loss(p, t, masks)
    torch.testing.assert_close(got, want.float(), equal_nan=True, **tol)
    # each sample on its own, so a NaN (an empty sample) cannot hide the others
    for b in range(p.shape[0]):
        one = (p[b : b + 1], t[b : b + 1], masks[b : b + 1])
        w = reference.upstream.train.get_batch_loss(*one)
        event(f"upstream formula: {'NaN' if w.isnan() else 'finite'} sample")
        torch.testing.assert_close(get_batch_loss(*one), w.float(), equal_nan=True, **tol)


# ---- CUDA (marked `cuda`: skipped without a GPU; benchmarks/gpu_check.sh runs them) ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_parity(dtype):
    gen = torch.Generator().manual_seed(10)
    B, T, H, W, D = 4, 9, 12, 14, 64
    p, t = inputs(B, T, H, W, D, dtype, gen)
    m = make_masks("mixed", B, T, H, W, gen)
    want = loss_and_grads(lambda a, b: reference.upstream.train.get_batch_loss(a, b, m), p, t)
    pc = p.detach().cuda().requires_grad_()
    tc = t.detach().cuda().requires_grad_()
    got = loss_and_grads(lambda a, b: get_batch_loss(a, b, m.cuda()), pc, tc)
    torch.testing.assert_close(got[0].cpu(), want[0].to(got[0].dtype), **TOL[dtype])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.cpu(), b, **TOL[dtype])
    # the GPU's loss and gradient equal the CPU walk of its grid bit for bit
    r = loss_token_ranges(m)
    g = torch.tensor(1.25)
    walk_loss, walk_grad = torch.ops.opensora_fast._masked_mse_grid_walk(g, p.detach(), t.detach(), r)
    gpu_loss = ops.masked_mse(pc.detach(), tc.detach(), r.cuda())
    gpu_grad = torch.ops.opensora_fast.masked_mse_backward(g.cuda(), pc.detach(), tc.detach(), r.cuda())
    assert torch.equal(gpu_loss.cpu(), walk_loss)
    assert torch.equal(gpu_grad.cpu(), walk_grad)


@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_capture():
    B, T, H, W, D = 4, 33, 24, 42, 64
    L = T * H * W // 4
    p = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    m = torch.zeros(B, T, H, W, device="cuda")
    m[0, 0] = 1
    get_batch_loss(p, t, m).backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        get_batch_loss(p, t, m).backward()
        get_batch_loss(p, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x = p.detach().clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.masked_mse(x, t, loss_token_ranges(m))
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = ops.masked_mse(x, t, loss_token_ranges(m))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.masked_mse(x, t, loss_token_ranges(m)))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.bool]
)
def test_cuda_loss_ranges_mask_dtypes_match_the_cpu_reference(dtype):
    gen = torch.Generator().manual_seed(16)
    m = (torch.rand(300, 6, generator=gen) < 0.4).float()
    m[::7, 2] = 2  # not conditioned
    m = m.to(dtype)
    for upstream in (True, False):
        want = reference.masked_mse.loss_ranges(m, 12, upstream)
        assert torch.equal(ops.loss_ranges(m.cuda(), 12, upstream).cpu(), want)
        assert torch.equal(ops.loss_ranges(m.t().cuda().t(), 12, upstream).cpu(), want)  # strided


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", WALK_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("offset", [0, 1])
def test_loss_equals_its_grid_walk(dtype, case, offset):
    B, L, D, r = case
    g = torch.Generator().manual_seed(B * L + D)
    n = B * L * D
    pbuf, tbuf = torch.randn(n + 1, generator=g).to(dtype), torch.randn(n + 1, generator=g).to(dtype)
    p, t = pbuf[offset : offset + n].view(B, L, D), tbuf[1 - offset : 1 - offset + n].view(B, L, D)
    ranges, grad = torch.tensor(r), torch.tensor(0.75)
    walk_loss, walk_grad = OP._masked_mse_grid_walk(grad, p, t, ranges)
    gpu_loss = OP.masked_mse(p.cuda(), t.cuda(), ranges.cuda())
    gpu_grad = OP.masked_mse_backward(grad.cuda(), p.cuda(), t.cuda(), ranges.cuda())
    assert_bitwise_equal(gpu_loss.cpu(), walk_loss)
    assert_bitwise_equal(gpu_grad.cpu(), walk_grad)


@pytest.mark.cuda
def test_loss_with_100k_samples():
    # once B lived in gridDim.y (max 65,535) and in shared memory (~12K rows)
    g = torch.Generator().manual_seed(3)
    p, t = torch.randn(100_000, 3, 1, generator=g), torch.randn(100_000, 3, 1, generator=g)
    ranges = torch.tensor([[0, 3], [1, 2]]).repeat(50_000, 1)
    walk_loss, walk_grad = OP._masked_mse_grid_walk(torch.tensor(1.0), p, t, ranges)
    assert_bitwise_equal(OP.masked_mse(p.cuda(), t.cuda(), ranges.cuda()).cpu(), walk_loss)
    assert_bitwise_equal(
        OP.masked_mse_backward(torch.tensor(1.0).cuda(), p.cuda(), t.cuda(), ranges.cuda()).cpu(), walk_grad
    )
    x = torch.randn(20_000, device="cuda")
    got = get_batch_loss(x, x * 0.5)
    torch.testing.assert_close(got, torch.nn.functional.mse_loss(x, x * 0.5))
    # fp32 accumulation on both sides: only the summation order differs
    want = reference.upstream.train.get_batch_loss(x.cpu(), x.cpu() * 0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_loss_side_stream_and_graph_capture():
    p = torch.randn(4, 8316, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.randn_like(p)
    r = torch.tensor([[0, 8316], [252, 8316], [0, 8064], [252, 8064]], device="cuda")
    one = torch.ones(())
    # CPU anchors on copies of the inputs: the walk of the GPU's grid (bit for
    # bit) and the reference (fp32 sums in another order: close)
    walk_loss, walk_grad = OP._masked_mse_grid_walk(one, p.cpu(), t.cpu(), r.cpu())
    ref_loss = reference.masked_mse.masked_mse(p.cpu(), t.cpu(), r.cpu())
    assert_bitwise_equal(walk_grad, reference.masked_mse.masked_mse_backward(one, p.cpu(), t.cpu(), r.cpu()))
    torch.testing.assert_close(walk_loss, ref_loss, rtol=1e-5, atol=1e-6)
    want = OP.masked_mse(p, t, r)
    assert_bitwise_equal(want, walk_loss, "eager vs CPU walk")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = OP.masked_mse(p, t, r)
        gg = OP.masked_mse_backward(torch.ones((), device="cuda"), p, t, r)
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise_equal(got, walk_loss, "side stream vs CPU walk")
    assert_bitwise_equal(gg, walk_grad, "side stream vs CPU reference")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP.masked_mse(p, t, r)
        gout = OP.masked_mse_backward(torch.ones((), device="cuda"), p, t, r)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, walk_loss, "graph replay vs CPU walk")
    assert_bitwise_equal(gout, walk_grad, "graph replay vs CPU reference")


@pytest.mark.cuda
@pytest.mark.slow
def test_loss_over_2_pow_31_elements():
    n = 2**31 + 64
    if free_cuda_bytes() < n * 4 + (1 << 30):
        pytest.skip("not enough GPU memory")
    p = torch.ones(1, n // 64, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros_like(p)
    r = torch.tensor([[0, n // 64]], device="cuda")
    assert float(OP.masked_mse(p, t, r)) == 1.0
    g = OP.masked_mse_backward(torch.ones((), device="cuda"), p, t, r)
    assert float(g[0, -1, -1]) == float(torch.tensor(2.0 / n, dtype=torch.bfloat16))


@pytest.mark.cuda
def test_loss_ranges_cuda_equals_cpu_without_sync():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.int64):
        for T in (1, 2, 5, 33):
            full = (torch.rand(300, T, 3, generator=g) < 0.3).to(dtype)
            m, d = full[:, :, 1], full.cuda()[:, :, 1]  # strided views, on each device
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = [OP.loss_ranges(d, 7, up) for up in (True, False)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            for up, r in zip((True, False), got):
                assert r.device.type == "cuda"
                assert torch.equal(r.cpu(), OP.loss_ranges(m, 7, up)), (dtype, T, up)
                assert torch.equal(r.cpu(), reference.masked_mse.loss_ranges(m, 7, up)), (dtype, T, up)


# ---- CPU ISA variants: the CUDA kernel's summation order in every one -----------------------

MSE_CASES = [  # B, L, D, ranges: odd sizes, misaligned chunk starts, several chunks, partial rounds
    (3, 3000, 7, [[0, 3000], [5, 2999], [1, 1]]),
    (2, 700, 64, [[0, 700], [100, 650]]),
    (2, 1025, 33, [[0, 1025], [3, 1000]]),
    (1, 5, 3, [[-4, 99]]),
    (4, 257, 17, [[0, 257], [1, 256], [0, 0], [250, 257]]),
]


@needs_native
@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=str)
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_masked_mse_forward_is_the_cuda_order_in_every_variant(dtype, case):
    # _masked_mse_grid_walk runs the CUDA kernel's per-thread body for every
    # (block, thread) and its shuffle tree on the CPU: the CPU op must give its bits.
    B, L, D, r = case
    gen = torch.Generator().manual_seed(B * L + D)
    p = torch.randn(B, L, D, generator=gen).to(dtype)
    t = torch.randn(B, L, D, generator=gen).to(dtype)
    ranges = torch.tensor(r)
    g = torch.tensor(0.75)
    walk_loss, walk_grad = OP._masked_mse_grid_walk(g, p, t, ranges)
    out = each_isa(lambda: (OP.masked_mse(p, t, ranges), OP.masked_mse_backward(g, p, t, ranges)))
    want = ref_mse.masked_mse(p, t, ranges)
    for isa, (loss, grad) in out.items():
        assert_bitwise_equal(loss, walk_loss, f"{isa} loss")
        assert_bitwise_equal(grad, walk_grad, f"{isa} grad")
        if torch.isnan(want):
            assert torch.isnan(loss)
        else:
            torch.testing.assert_close(loss, want, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


def order_sensitive(B, L, D, dtype, gen, mode):
    """pred, target whose loss shows any change of summation order: "lane": in each
    chunk only one GPU thread's elements differ, each by its own power of two (the
    partial is that thread's rounded sum, exactly); "tree": each thread's
    differences scaled by its own power of two (the block tree's order shows)."""
    V, chunk = 16 // torch.empty((), dtype=dtype).element_size(), 16384
    p = torch.randn(B, L * D, generator=gen, dtype=torch.float64)
    d = torch.randn(B, L * D, generator=gen, dtype=torch.float64)
    j = torch.arange(L * D)
    thread = (j % chunk) // V % 256
    span = 4
    if mode == "lane":  # each element its own scale: the thread's sum rounds at every step
        pick = torch.randint(0, 256, (B, L * D // chunk + 1), generator=gen)
        d = (
            d
            * (thread == pick[:, j // chunk])
            * torch.exp2(torch.randint(-span, span, d.shape, generator=gen).double())
        )
    else:
        d = d * torch.exp2(torch.randint(-span, span, (256,), generator=gen).double())[thread]
    pred = p.to(dtype)
    return pred.view(B, L, D), (pred.double() + d).to(dtype).view(B, L, D)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=str)
@pytest.mark.parametrize("mode", ["lane", "tree"])
def test_masked_mse_forward_cuda_order_where_order_shows(dtype, mode):
    # With plain random data a different order inside one thread's sum mostly
    # vanishes below the total's last bit. Here one sample of one chunk of
    # 2^14 elements: the loss is the block's partial / 2^14, exactly.
    gen = torch.Generator().manual_seed(17)
    for trial in range(6):
        B, L, D = (1, 256, 64) if trial < 5 else (1, 257, 63)  # the last: partial round and group
        p, t = order_sensitive(B, L, D, dtype, gen, mode)
        ranges = torch.tensor([[0, L]])
        walk = OP._masked_mse_grid_walk(torch.tensor(1.0), p, t, ranges)[0]
        for isa, loss in each_isa(lambda: OP.masked_mse(p, t, ranges)).items():
            assert_bitwise_equal(loss, walk, f"{mode} trial {trial} {isa}")


@needs_native
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_masked_mse_forward_cuda_order_with_special_values(dtype):
    # subnormal differences, infinities and NaN go through the same order too
    gen = torch.Generator().manual_seed(11)
    B, L, D = 2, 300, 29
    p = with_specials(B * L * D, dtype, gen).view(B, L, D)
    t = with_specials(B * L * D, dtype, gen).view(B, L, D)
    t[0] = p[0] + with_specials(L * D, dtype, gen).view(L, D).nan_to_num(0, 0, 0) * 1e-3  # finite sample
    ranges = torch.tensor([[0, L], [7, 290]])
    walk = OP._masked_mse_grid_walk(torch.tensor(1.0), p[:1], t[:1], ranges[:1])[0]
    for isa, loss in each_isa(lambda: OP.masked_mse(p[:1], t[:1], ranges[:1])).items():
        assert_bitwise_equal(loss, walk, isa)
    for isa, loss in each_isa(lambda: OP.masked_mse(p, t, ranges)).items():
        assert torch.isnan(loss) or torch.isinf(loss), isa


@needs_native
def test_masked_mse_forward_at_every_byte_offset():
    # the AVX-512 build takes 64-byte-aligned chunks, the others the 32-byte one
    gen = torch.Generator().manual_seed(13)
    B, L, D = 2, 130, 64
    for dtype in (torch.float32, torch.bfloat16):
        p0, t0 = torch.randn(B, L, D, generator=gen).to(dtype), torch.randn(B, L, D, generator=gen).to(dtype)
        ranges = torch.tensor([[0, L], [2, L]])
        walk = OP._masked_mse_grid_walk(torch.tensor(1.0), p0, t0, ranges)[0]
        for off in range(0, 64 // p0.element_size(), 3):
            bp = torch.empty(p0.numel() + 64, dtype=dtype)
            p = bp[off : off + p0.numel()].view(B, L, D)
            p.copy_(p0)
            for isa, loss in each_isa(lambda: OP.masked_mse(p, t0, ranges)).items():
                assert_bitwise_equal(loss, walk, f"{dtype} offset {off} {isa}")


# ---- CUDA: loss_ranges under graph capture and on a side stream -----------------------------


@pytest.mark.cuda
def test_loss_ranges_graph_capture_replays_and_side_stream():
    g = torch.Generator().manual_seed(9)
    full = (torch.rand(300, 33, 3, generator=g) < 0.3).float().cuda()
    m = full[:, :, 1]  # a strided view
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [OP.loss_ranges(m, 7, up) for up in (True, False)]
    for _ in range(2):
        full.copy_((torch.rand(300, 33, 3, generator=g) < 0.3).float())
        graph.replay()
        torch.cuda.synchronize()
        for up, r in zip((True, False), got):
            assert torch.equal(r.cpu(), OP.loss_ranges(m.cpu(), 7, up)), up
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            on_side = [OP.loss_ranges(m, 7, up) for up in (True, False)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for up, r in zip((True, False), on_side):
        assert torch.equal(r.cpu(), OP.loss_ranges(m.cpu(), 7, up)), up


# ---- edge shapes: an empty dimension, on the CPU and CUDA -----------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,L,D", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_loss_with_an_empty_dimension_forward_and_backward(device, B, L, D):
    skip_without_native()
    p = torch.randn(B, L, D, device=device, requires_grad=True)
    t = torch.randn(B, L, D, device=device)
    r = torch.tensor([[0, L]] * B, dtype=torch.long).view(B, 2).to(device)
    loss = ops.masked_mse(p, t, r)
    loss.backward(torch.tensor(0.5, device=device))
    walk_loss, walk_grad = OP._masked_mse_grid_walk(torch.tensor(0.5), p.detach().cpu(), t.cpu(), r.cpu())
    assert loss.dtype == walk_loss.dtype and loss.shape == ()
    assert torch.isnan(loss) and torch.isnan(walk_loss)  # a mean over nothing, as upstream's
    assert p.grad.shape == (B, L, D) and p.grad.device == p.device
    assert_bitwise_equal(p.grad, walk_grad, "grad")
    raw = OP.masked_mse_backward(torch.tensor(0.5, device=device), p.detach(), t, r)
    assert_bitwise_equal(raw, walk_grad, "masked_mse_backward")


@pytest.mark.parametrize("B,L,D", [(2, 0, 3), (2, 5, 0)])
def test_loss_reference_with_an_empty_dimension_forward_and_backward(B, L, D):
    p = torch.randn(B, L, D, requires_grad=True)
    loss = reference.masked_mse.masked_mse(p, torch.randn(B, L, D), torch.tensor([[0, L]] * B))
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, p)
    assert g.shape == (B, L, D)


def test_loss_reference_with_no_samples_backward():
    p = torch.randn(0, 5, 3, requires_grad=True)
    loss = reference.masked_mse.masked_mse(p, torch.randn(0, 5, 3), torch.zeros(0, 2, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, p)
    assert g.shape == (0, 5, 3)
