"""Every op at once in one case: each runs on its tensors' device and that device's
current stream (not the current device's), results equal to another device's.
Cross-op, so not in one ``test_<op>.py``."""

import pytest
import torch
from helpers import assert_bitwise_equal, unpad_shards

from opensora_fast import ops

OP = torch.ops.opensora_fast


def _all_ops(device: str) -> dict:
    """Every op once on ``device`` (inputs from a fixed seed); results on the CPU."""
    g = torch.Generator().manual_seed(21)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    res = {}
    sizes = (1, 4099, 70001)
    ema = [r(n, dtype=torch.bfloat16) for n in sizes]
    src = [r(n) for n in sizes]
    OP.ema_update_(ema, src, 0.999, False, 0)
    OP.ema_update_(ema, src, 0.999, True, 5)
    res["ema_update_"] = ema
    p, t = r(3, 3001, 7), r(3, 3001, 7)
    rg = torch.tensor([[0, 3001], [5, 2999], [1, 1]], device=device)
    res["masked_mse"] = [OP.masked_mse(p, t, rg), OP.masked_mse_backward(torch.tensor(0.5, device=device), p, t, rg)]
    mask = (torch.rand(300, 33, generator=g) < 0.3).to(device)
    res["loss_ranges"] = [OP.loss_ranges(mask, 7, True), OP.loss_ranges(mask, 7, False)]
    srcs = [r(5, 10, 13, 11), r(5, 10, 13, 11, dtype=torch.bfloat16)]
    plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 0, 3, 2, 2, 3, 1, 4, 2, 6, 2, 0, 0]
    res["condition"] = list(OP.condition(r(3, 5, 9, 13, 11), srcs, plan))
    cond = torch.full((3, 6, 9, 13, 11), 7.0, device=device)
    OP.condition_cat_(cond, srcs, plan)
    res["condition_cat_"] = [cond]
    shapes = [(), (1,), (5, 3), (40000,)] + [(17,)] * 40
    gathered, off, sh, bg, ct = unpad_shards(3, shapes, torch.float32, g)
    dev_out = [torch.zeros(s, device=device) for s in shapes]
    OP.unpad_(gathered.to(device), dev_out, off, sh, bg, ct)
    res["unpad_"] = dev_out
    if device != "cpu":
        pinned = [torch.zeros(s).pin_memory() for s in shapes]
        OP.unpad_(gathered.to(device), pinned, off, sh, bg, ct)
        torch.cuda.current_stream(torch.device(device)).synchronize()
        res["unpad_ pinned"] = pinned
    params = [r(n) for n in (5, 4099, 33)]
    grads = [r(n) for n in (5, 4099, 33)]
    m = [r(n) * 0.1 for n in (5, 4099, 33)]
    v = [r(n).square() * 0.01 for n in (5, 4099, 33)]
    steps = [torch.tensor(3.0) for _ in params]
    twins = [r(n, dtype=torch.bfloat16) for n in (5, 4099, 33)]
    ops.adamw_ema_(
        params, grads, m, v, [], steps, [3], [1e-3], [0.9], [0.999], [1e-8], [0.01], [False], [False],
        twins, params, 0.999, stochastic=True, seed=3,
    )  # fmt: skip
    res["adamw_ema_"] = params + m + v + twins + steps
    return {k: [x.cpu() for x in xs] for k, xs in res.items()}


@pytest.mark.cuda
def test_every_op_on_a_second_device_from_its_side_stream():
    """Tensors on cuda:1, cuda:0 current, a side stream of cuda:1 current there:
    each op must run on cuda:1's current stream and leave cuda:0 current. cuda:0's
    results (its kernels are checked against the CPU elsewhere) are the oracle."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    want = _all_ops("cuda:0")
    before = torch.cuda.current_stream(1)
    side = torch.cuda.Stream(device=1)
    torch.cuda.set_stream(side)  # cuda:1's current stream (it also makes cuda:1 current)
    torch.cuda.set_device(0)
    try:
        assert torch.cuda.current_stream(1) == side
        got = _all_ops("cuda:1")  # inputs made and results read on `side` too
        assert torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_stream(before)
        torch.cuda.set_device(0)
    assert want.keys() == got.keys()
    for k in want:
        for i, (a, b) in enumerate(zip(want[k], got[k])):
            assert_bitwise_equal(b, a, f"{k}[{i}] on cuda:1")
