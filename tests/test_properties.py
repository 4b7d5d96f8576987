"""Property-based differential suite: native kernels vs the PyTorch reference
(and the CUDA grid walks vs the CPU kernels) on random shapes, dtypes, storage
offsets, aliasing, NaN/Inf, empty and long lists, ranges. Profile "ci" (fixed,
bounded) by default; ``--hypothesis-profile=long`` for a deeper run."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opensora_fast import reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.utils.train import get_batch_loss

from helpers import FLOATS, assert_bitwise_equal

pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
OP = torch.ops.opensora_fast
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0, 3.0e38]


def _values(draw, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if n and draw(st.booleans()):  # a few special values
        for _ in range(draw(st.integers(1, 3))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return x.to(dtype)


def _placed(draw, x):
    """x at a random element offset inside a bigger buffer (still contiguous)."""
    off = draw(st.integers(0, 7))
    buf = torch.empty(x.numel() + off + draw(st.integers(0, 3)), dtype=x.dtype)
    view = buf[off : off + x.numel()]
    view.copy_(x)
    return view


@st.composite
def ema_calls(draw):
    k = draw(st.integers(0, 6))
    ema, src = [], []
    for i in range(k):
        n = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 4099]))
        edt, sdt = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
        seed = draw(st.integers(0, 2**31))
        ema.append(_placed(draw, _values(draw, n, edt, seed)))
        src.append(_placed(draw, _values(draw, n, sdt, seed + 1)))
    if k and draw(st.integers(0, 4)) == 0:  # aliasing: both backends must refuse it alike
        i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        if ema[i].numel():
            src[j] = ema[i] if src[j].shape == ema[i].shape else src[j]
    decay = draw(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.999, 0.9999]) | st.floats(0, 1))
    return ema, src, decay, draw(st.booleans()), draw(st.integers(-(2**63), 2**63 - 1))


def _outcome(fn, ema, src, decay, stochastic, seed):
    out = [e.clone() for e in ema]
    try:
        fn(out, src, decay, stochastic, seed)
    except Exception as e:  # noqa: BLE001 - the contract: same type, same message
        return type(e), str(e).splitlines()[0], None
    return None, None, out


def _within_torch_quirk(a, b, s, decay, same_reduced):
    """Bitwise, except that torch's own bf16/bf16 and fp16/fp16 add rounds the
    scalar remainder of its thread chunks differently: it rounds (1-d)*src to
    the dtype first, so there the two differ by at most one rounding of
    (1-d)*src plus one of the result (several ulps of the result when the sum
    cancels)."""
    if not same_reduced:
        return assert_bitwise_equal(a, b)
    diff = (a.float() != b.float()) & ~(a.isnan() & b.isnan())
    eps, tiny = torch.finfo(a.dtype).eps, torch.finfo(a.dtype).tiny
    bound = eps * (b.float().abs() + ((1 - decay) * s.float()).abs()) + tiny
    assert bool(((a.float() - b.float()).abs() <= bound)[diff].all())


@given(ema_calls())
def test_ema_native_equals_reference(call):
    ema, src, decay, stochastic, seed = call
    # the source views keep their values: the refusal of aliasing writes nothing
    nat = _outcome(OP.ema_update_, ema, src, decay, stochastic, seed)
    ref = _outcome(reference.ema_update_, ema, src, decay, stochastic, seed)
    assert nat[:2] == ref[:2]
    if nat[2] is None:
        return
    for a, b, s in zip(nat[2], ref[2], src):
        same_reduced = a.dtype == s.dtype and a.dtype != torch.float32 and not stochastic
        _within_torch_quirk(a, b, s, decay, same_reduced)


@given(ema_calls(), st.sampled_from([(0, 0, False), (3, 5, False), (0, 0, True), (2, 3, True)]))
def test_ema_grid_walk_equals_cpu_kernel(call, limits):
    ema, src, decay, stochastic, seed = call
    nat = _outcome(OP.ema_update_, ema, src, decay, stochastic, seed)
    walk = _outcome(lambda e, s, d, st_, sd: OP._ema_update_grid_walk_(e, s, d, st_, sd, *limits), ema, src, decay, stochastic, seed)
    assert nat[:2] == walk[:2]
    for a, b in zip(nat[2] or [], walk[2] or []):
        assert_bitwise_equal(a, b)


@st.composite
def mse_calls(draw):
    B, L, D = draw(st.integers(0, 4)), draw(st.integers(0, 40)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, L, D, generator=g).to(dtype)
    t = torch.randn(B, L, D, generator=g).to(dtype)
    ranges = torch.tensor(
        [[draw(st.integers(-3, L + 3)), draw(st.integers(-3, L + 3))] for _ in range(B)], dtype=torch.int64
    ).reshape(B, 2)
    if B and L and draw(st.booleans()):  # NaN/Inf outside the first sample's range
        s = max(0, min(L, int(ranges[0, 0])))
        if s > 0:
            p[0, s - 1, 0] = draw(st.sampled_from([float("nan"), float("inf")]))
    return p, t, ranges


@given(
    st.integers(0, 5), st.integers(1, 9), st.integers(0, 7),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.bool, torch.int32]),
    st.booleans(), st.integers(0, 2**31), st.integers(1, 3),
)
def test_loss_ranges_native_equals_reference(B, T, hw, dtype, upstream, seed, step):
    # values from {0, 1, 2, NaN}: only 1 is a conditioned frame; a strided view
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan")])[torch.randint(0, 5, (B, T * step), generator=g)]
    if not dtype.is_floating_point:
        vals = torch.nan_to_num(vals, nan=3.0)
    frame = vals.to(dtype)[:, ::step]
    assert torch.equal(OP.loss_ranges(frame, hw, upstream), reference.loss_ranges(frame, hw, upstream))


@given(mse_calls(), st.sampled_from([1.0, 2.5, -0.75]))
def test_masked_mse_native_equals_reference(call, gscale):
    p, t, ranges = call
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    loss = OP.masked_mse(p, t, ranges)
    want = reference.masked_mse(p, t, ranges)
    assert loss.dtype == want.dtype == acc
    tol = dict(rtol=1e-5, atol=1e-6) if acc == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, want, equal_nan=True, **tol)
    g = torch.tensor(gscale)
    # the gradient is elementwise with the same roundings: bit for bit
    assert_bitwise_equal(OP.masked_mse_backward(g, p, t, ranges), reference.masked_mse_backward(g, p, t, ranges))
    wl, wg = OP._masked_mse_grid_walk(g, p, t, ranges)
    torch.testing.assert_close(wl, loss, equal_nan=True, **tol)
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
    got = get_batch_loss(p, t, masks)
    want = reference.get_batch_loss(p, t, masks)
    tol = dict(rtol=1e-5, atol=1e-6) if p.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(got, want.float(), equal_nan=True, **tol)
