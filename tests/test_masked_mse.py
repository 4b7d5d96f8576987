"""Masked per-sample MSE (get_batch_loss): native op vs the upstream port / the reference."""

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.reference.masked_mse import MASK_DTYPES
from opensora_fast.utils.train import get_batch_loss, loss_token_ranges

# Only a declared pure-Python install skips; a build that silently failed must fail here.
pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)

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


# ----------------------------------------------------------------------------- CUDA


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


WALK_CASES = [  # B, L, D, ranges
    (3, 3000, 7, [[0, 3000], [5, 2999], [1, 1]]),  # odd D: chunks start misaligned; an empty sample
    (2, 700, 64, [[0, 700], [100, 650]]),  # aligned 16-byte path, several chunks
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
