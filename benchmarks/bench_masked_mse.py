"""get_batch_loss forward+backward on packed Open-Sora latents: the upstream-faithful
reference vs a vectorised plain-PyTorch version (token mask, no Python loop) vs the
fused op. Bytes counted: forward reads pred and target, backward reads them again
and writes grad_pred."""

import pytest
import torch

from benchmarks.common import bench_device, peak_extra_bytes, run
from opensora_fast import reference
from opensora_fast.utils.train import get_batch_loss, loss_token_ranges

# name: (B, T, H, W) of the latent; packed L = T*H*W/4 tokens of D = 16*4 = 64
CASES = {"256px 129f": (4, 33, 24, 42), "768px 129f": (4, 33, 72, 128)}


@pytest.fixture(scope="module", params=[(c, m) for c in CASES for m in ("masked", "unmasked")], ids=str)
def case(request):
    name, kind = request.param
    B, T, H, W = CASES[name]
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    L, D = T * H * W // 4, 64
    pred = torch.randn(B, L, D, generator=g, device=dev).bfloat16().requires_grad_()
    target = torch.randn(B, L, D, generator=g, device=dev).bfloat16()
    masks = None
    if kind == "masked":  # one sample of each i2v kind, one t2v
        masks = torch.zeros(B, T, H, W, device=dev)
        masks[0, 0] = 1
        masks[1, -1] = 1
        masks[2, 0] = masks[2, -1] = 1
    nbytes = 5 * pred.numel() * pred.element_size()
    group = f"get_batch_loss fwd+bwd {kind}, {name}: [{B}, {L}, {D}] bf16, {dev.type}"
    return group, pred, target, masks, nbytes, dev


def _fwd_bwd(loss_fn, pred, target, masks):
    def step():
        loss = loss_fn(pred, target, masks)
        (grad,) = torch.autograd.grad(loss, [pred])
        return grad

    return step


def _plain_pytorch(pred, target, masks):
    if masks is None:
        return reference.masked_mse.masked_mse(
            pred, target, torch.tensor([[0, pred.shape[1]]] * pred.shape[0], device=pred.device)
        )
    return reference.masked_mse.masked_mse(pred, target, loss_token_ranges(masks))


IMPLS = {
    "upstream get_batch_loss": ("baseline", reference.upstream.train.get_batch_loss),
    "plain PyTorch, token mask": ("alternative", _plain_pytorch),
    "opensora_fast get_batch_loss": ("ours", get_batch_loss),
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_loss(benchmark, case, impl):
    group, pred, target, masks, nbytes, dev = case
    role, fn = IMPLS[impl]
    step = _fwd_bwd(fn, pred, target, masks)
    step()
    peak = peak_extra_bytes(step, dev)
    grad_mb = pred.numel() * pred.element_size() / 2**20
    run(
        benchmark,
        step,
        group=group,
        impl=impl,
        role=role,
        nbytes=nbytes,
        rounds=5,
        peak_extra_mb=round(peak / 2**20, 1),
        grad_mb=round(grad_mb, 1),
    )
