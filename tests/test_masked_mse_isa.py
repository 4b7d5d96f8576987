"""masked_mse / loss_ranges tests waiting to be folded into tests/test_masked_mse.py:
the CPU forward sums in the CUDA kernel's order in every CPU ISA variant (its bits
equal the CPU walk of the CUDA body), empty dimensions on both backends, and
loss_ranges under graph capture and on a side stream."""

import pytest
import torch
from helpers import (
    DEVICES,
    FLOATS,
    assert_bitwise_equal,
    each_isa,
    needs_native,
    skip_without_native,
    with_specials,
)

from opensora_fast import ops, reference
from opensora_fast.reference import masked_mse as ref_mse

OP = torch.ops.opensora_fast

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
