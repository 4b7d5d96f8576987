"""Property-based differential suite: native kernels vs the PyTorch reference
(and the CUDA grid walks vs the CPU kernels) on random shapes, dtypes, storage
offsets, aliasing, NaN/Inf, empty and long lists, ranges. Profile "ci" (fixed,
bounded) by default; ``--hypothesis-profile=long`` for a deeper run."""

import dataclasses
import os
from typing import Optional

import pytest
import torch
from helpers import FLOATS, assert_bitwise_equal, assert_ema_matches_reference
from hypothesis import event, given
from hypothesis import strategies as st

from opensora_fast import reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.utils.train import get_batch_loss

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
def test_loss_ranges_native_equals_reference(B, T, hw, dtype, upstream, seed, step):
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
