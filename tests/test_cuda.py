"""CUDA launch paths, each checked bit for bit against our CPU op or the CPU
walk of the same grid (issue: CUDA review). Marked `cuda`: skipped without a
GPU; benchmarks/gpu_check.sh runs them on a lent one."""

import pytest
import torch
from helpers import PAIRS, assert_bitwise_equal, assert_ema_matches_reference, rand, shard_sizes

from opensora_fast import ops, reference

pytestmark = pytest.mark.cuda
OP = torch.ops.opensora_fast


def _ema_case(edt_sdt_pairs, sizes, seed, misalign=False):
    g = torch.Generator().manual_seed(seed)
    ema, src = [], []
    for i, n in enumerate(sizes):
        edt, sdt = edt_sdt_pairs[i % len(edt_sdt_pairs)]
        e, s = rand(n + 1, edt, g), rand(n + 1, sdt, g, scale=3.0)
        ema.append(e[1:] if misalign and i % 2 else e[:n].clone())
        src.append(s[1:] if misalign and i % 3 == 0 else s[:n].clone())
    return ema, src


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


def test_ema_stochastic_refused_under_capture_and_writes_nothing():
    e = torch.randn(1000, device="cuda").bfloat16()
    before = e.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            OP.ema_update_([e], [torch.randn(1000, device="cuda")], 0.99, True, 1)
    assert_bitwise_equal(e, before)


WALK_CASES = [  # B, L, D, ranges (the CPU walk cases of test_masked_mse.py)
    (3, 3000, 7, [[0, 3000], [5, 2999], [1, 1]]),
    (2, 700, 64, [[0, 700], [100, 650]]),
    (1, 5, 3, [[-4, 99]]),
]


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
    from opensora_fast.utils.train import get_batch_loss

    x = torch.randn(20_000, device="cuda")
    got = get_batch_loss(x, x * 0.5)
    torch.testing.assert_close(got, torch.nn.functional.mse_loss(x, x * 0.5))
    # fp32 accumulation on both sides: only the summation order differs
    want = reference.upstream.train.get_batch_loss(x.cpu(), x.cpu() * 0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


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


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_ema_over_2_pow_31_elements():
    n = 2**31 + 4099
    if _free_bytes() < n * 6 + (1 << 30):
        pytest.skip("not enough GPU memory")
    e = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    s = torch.ones(n, device="cuda")
    OP.ema_update_([e], [s], 0.5)
    assert float(e[-1]) == 0.5 and float(e[2**31 + 1]) == 0.5 and float(e[0]) == 0.5
    del e, s


@pytest.mark.slow
def test_loss_over_2_pow_31_elements():
    n = 2**31 + 64
    if _free_bytes() < n * 4 + (1 << 30):
        pytest.skip("not enough GPU memory")
    p = torch.ones(1, n // 64, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros_like(p)
    r = torch.tensor([[0, n // 64]], device="cuda")
    assert float(OP.masked_mse(p, t, r)) == 1.0
    g = OP.masked_mse_backward(torch.ones((), device="cuda"), p, t, r)
    assert float(g[0, -1, -1]) == float(torch.tensor(2.0 / n, dtype=torch.bfloat16))


# ----------------------------------------------------------------- unpad_


def _unpad_case(world, sizes, dtype, seed):
    from test_unpad import bucketed, rnd

    g = torch.Generator().manual_seed(seed)
    params = [rnd(s, dtype, g) for s in sizes]
    return params, bucketed(params, world)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.complex128])
def test_unpad_cuda_equals_cpu_into_device_and_pinned(dtype):
    # > 256 entries (several tables), one entry over 3072 chunks, 0-dim, smaller than the world
    big = 3072 * 16384 + 11 if dtype == torch.bfloat16 else 70001  # > one table of chunks (bf16 only: memory)
    sizes = [(), (1,), (2,), (5, 3), (big,)] + [(64 + i,) for i in range(300)]
    params, (gathered, idx, off, sh, bg, ct) = _unpad_case(3, sizes, dtype, 4)
    want = [torch.zeros_like(p) for p in params]
    OP.unpad_(gathered, want, off, sh, bg, ct)
    dev = [torch.zeros_like(p, device="cuda") for p in params]
    OP.unpad_(gathered.cuda(), dev, off, sh, bg, ct)
    pinned = [torch.zeros_like(p).pin_memory() for p in params]
    OP.unpad_(gathered.cuda(), pinned, off, sh, bg, ct)  # the kernel writes host memory directly
    torch.cuda.synchronize()
    for i, (w, d, h, p) in enumerate(zip(want, dev, pinned, params)):
        assert torch.equal(w.view(-1).view(torch.uint8), p.view(-1).view(torch.uint8)), i
        assert torch.equal(d.cpu().view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), i
        assert torch.equal(h.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), i


def test_unpad_cuda_refuses_unpinned_host_and_does_not_sync():
    params, (gathered, idx, off, sh, bg, ct) = _unpad_case(2, [(7,), (3, 3)], torch.float32, 5)
    g = gathered.cuda()
    with pytest.raises(ValueError, match=r"out\[0\] is on cpu but gathered is on cuda:0"):
        OP.unpad_(g, [torch.zeros(7), torch.zeros(3, 3, device="cuda")], off, sh, bg, ct)
    outs = [torch.zeros_like(p, device="cuda") for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            OP.unpad_(g, outs, off, sh, bg, ct)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for o, p in zip(outs, params):
        assert torch.equal(o.cpu(), p)


@pytest.mark.parametrize("layout", ["separate", "flat", "flat_reversed"])
@pytest.mark.parametrize("staging", [False, True, None])
def test_model_gathering_nccl_into_pinned(staging, layout):
    """1 rank on NCCL: the bucketed gather into pinned host memory, with the kernel
    writing it directly or through the device staging buffer and the copy engine;
    into separate pinned tensors or into views of pinned segments (CheckpointIO's,
    where staging is the default), also laid out in reverse (nothing to merge)."""
    import torch.distributed as dist

    from opensora_fast.utils import ckpt

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(11)
        ema = torch.nn.Module()
        shapes = [(5, 3), (), (1,), (4097,), (33, 17), (300, 301)]
        for i, s in enumerate(shapes):
            ema.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g).bfloat16().cuda()))
        orig = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
        shape_dict = ckpt.record_model_param_shape(ema)
        ckpt.model_sharding(ema)
        if layout == "separate":
            pinned = {k: torch.full(v, -7.0, dtype=torch.bfloat16, pin_memory=True) for k, v in shape_dict.items()}
        else:
            entries = [(k, v, torch.bfloat16) for k, v in shape_dict.items()]
            pinned = ckpt.CheckpointIO._pinned_dict(entries if layout == "flat" else entries[::-1])
            for v in pinned.values():
                assert v.is_pinned()
                v.fill_(-7.0)
        # a small bucket: parameters split across buckets go direct, whole ones are staged
        ckpt.model_gathering(ema, shape_dict, pinned, bucket_bytes=4096, staging=staging, progress=False)
        for k, v in orig.items():
            assert_bitwise_equal(pinned[k], v, f"{k} staging={staging} {layout}")
        # extra device memory: at most two buckets (staged: one gathered and two
        # staging buffers of 2/3 of a bucket each), plus the allocator's 512-byte
        # rounding of each buffer and the small flag tensors
        bucket = 64 << 10
        for v in pinned.values():
            v.fill_(-7.0)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ckpt.model_gathering(ema, shape_dict, pinned, bucket_bytes=bucket, staging=staging, progress=False)
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= 2 * bucket + 4096, (extra, staging, layout)
        for k, v in orig.items():
            assert_bitwise_equal(pinned[k], v, f"{k} staging={staging} {layout} bucket={bucket}")
    finally:
        dist.destroy_process_group()


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
