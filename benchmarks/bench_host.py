"""Host time per call of the drop-ins, where the kernels do next to nothing: the
Python (and dispatcher) cost that a GPU step pays before its kernels run.

update_ema over a module tree shaped like the 11B model (1,082 parameters in
~1,100 modules, every tensor 4 elements, bf16 working model with fp32 masters,
sharded=True as in Open-Sora's train loop): the upstream-faithful loop, the
drop-in on its native fast path (csrc/ema/ema_plan.cpp), on its validating path
and on the reference backend, and the op alone on the same lists. get_batch_loss on tiny
inputs next to upstream's; an optimizer step with its EMA (torch's fused AdamW
then update_ema, FusedAdamW with the EMA attached) over the same tree. One thread."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import run
from benchmarks.layouts import flux_mmdit_11b_shapes
from opensora_fast import reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.optim import FusedAdamW
from opensora_fast.utils import _ema
from opensora_fast.utils.train import get_batch_loss, update_ema

logging.getLogger("opensora_fast").setLevel(logging.ERROR)
DECAY = 0.9999


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Masters:
    """A ZeRO optimizer's working-to-master map: fp32 copies of the bf16 parameters."""

    def __init__(self, model: nn.Module) -> None:
        self._map = {id(p): p.detach().float().clone() for p in model.parameters()}

    def get_working_to_master_map(self) -> dict:
        return self._map


def tiny_11b(per_block: int = 19) -> nn.Module:
    """One tiny parameter per tensor of the 11B layout (1,082), held in leaf modules
    of up to two parameters (weight, bias), each leaf next to a parameter-free
    module (an activation), leaves grouped into blocks: about the real model's
    number of modules, so the per-step walk costs what it costs there."""
    n = len(flux_mmdit_11b_shapes())
    root, blocks, block, k = nn.Module(), nn.ModuleList(), None, 0
    while k < n:
        if block is None or len(block._modules) >= 2 * per_block:
            block = nn.Module()
            blocks.append(block)
        leaf = nn.Module()
        leaf.weight = nn.Parameter(torch.randn(4))
        k += 1
        if k < n:
            leaf.bias = nn.Parameter(torch.randn(4))
            k += 1
        i = len(block._modules) // 2
        block.add_module(f"lin{i}", leaf)
        block.add_module(f"act{i}", nn.SiLU())
    root.blocks = blocks
    return root


@pytest.fixture(scope="module")
def ema_setup():
    torch.manual_seed(0)
    model = tiny_11b().bfloat16()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = _Masters(model)
    nparams = sum(1 for _ in model.parameters())
    group = f"update_ema host cost, {nparams} tensors of 4 elements (11B layout, bf16 + fp32 masters), cpu, 1 thread"
    nbytes = sum(p.numel() * (2 + 2 + 4) for p in model.parameters())
    return group, model, ema, opt, nbytes


def test_update_ema_upstream(benchmark, ema_setup):
    group, model, ema, opt, nbytes = ema_setup
    step = reference.upstream.train.update_ema
    run(
        benchmark,
        lambda: step(ema, model, opt, DECAY),
        group=group,
        impl="upstream loop",
        role="baseline",
        nbytes=nbytes,
    )


def test_update_ema_reference_backend(benchmark, ema_setup, monkeypatch):
    group, model, ema, opt, nbytes = ema_setup
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    run(
        benchmark,
        lambda: update_ema(ema, model, opt, DECAY),
        group=group,
        impl="drop-in, reference backend",
        role="alternative",
        nbytes=nbytes,
    )


def test_update_ema_native(benchmark, ema_setup):
    group, model, ema, opt, nbytes = ema_setup
    run(
        benchmark,
        lambda: update_ema(ema, model, opt, DECAY),
        group=group,
        impl="drop-in, native",
        role="ours",
        nbytes=nbytes,
    )


def test_update_ema_validating_path(benchmark, ema_setup, monkeypatch):
    group, model, ema, opt, nbytes = ema_setup
    monkeypatch.setattr(_ema, "_arm", lambda *a: None)  # never armed: every step validates
    _ema._plans.pop(ema, None)
    run(
        benchmark,
        lambda: update_ema(ema, model, opt, DECAY),
        group=group,
        impl="drop-in, validating path (native fast path off)",
        role="part",
        nbytes=nbytes,
    )
    _ema._plans.pop(ema, None)


def test_update_ema_op_alone(benchmark, ema_setup):
    group, model, ema, opt, nbytes = ema_setup
    update_ema(ema, model, opt, DECAY)
    plan = _ema._plans[ema]
    if not HAS_NATIVE:
        pytest.skip("no native extension")
    op = torch.ops.opensora_fast.ema_update_
    run(
        benchmark,
        lambda: op(plan.ema, plan.src, DECAY, False, 0),
        group=group,
        impl="torch.ops ema_update_ alone (C++)",
        role="part",
        nbytes=nbytes,
    )


@pytest.fixture(scope="module", params=["unmasked", "masked"])
def loss_setup(request):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    target = torch.randn(4, 16, 8, generator=g)
    masks = None
    if request.param == "masked":
        masks = torch.zeros(4, 4, 4, 4)  # T=4, 2x2 tokens per frame at patch 2: L=16
        masks[0, 0] = 1
        masks[1, -1] = 1
    group = f"get_batch_loss host cost fwd+bwd, {request.param}, [4, 16, 8] fp32, cpu, 1 thread"
    return group, pred, target, masks, pred.numel() * 4 * 3


def test_loss_upstream(benchmark, loss_setup):
    group, pred, target, masks, nbytes = loss_setup
    loss = reference.upstream.train.get_batch_loss
    run(
        benchmark,
        lambda: torch.autograd.grad(loss(pred, target, masks), [pred]),
        group=group,
        impl="upstream",
        role="baseline",
        nbytes=nbytes,
    )


def test_loss_mse_alone(benchmark, loss_setup):
    group, pred, target, masks, nbytes = loss_setup
    run(
        benchmark,
        lambda: torch.autograd.grad(F.mse_loss(pred.float(), target.float()), [pred]),
        group=group,
        impl="F.mse_loss (for scale)",
        role="alternative",
        nbytes=nbytes,
    )


def test_loss_dropin(benchmark, loss_setup):
    group, pred, target, masks, nbytes = loss_setup
    run(
        benchmark,
        lambda: torch.autograd.grad(get_batch_loss(pred, target, masks), [pred]),
        group=group,
        impl="drop-in",
        role="ours",
        nbytes=nbytes,
    )


def test_loss_raw_op_alone(benchmark, loss_setup):
    # the op with its C++ autograd on the drop-in's inputs: the dispatcher and
    # engine share of the drop-in's host time
    group, pred, target, masks, nbytes = loss_setup
    if not HAS_NATIVE:
        pytest.skip("no native extension")
    p3, t3 = pred.reshape(1, -1, 1), target.reshape(1, -1, 1)
    ranges = torch.tensor([[0, p3.shape[1]]])
    op = torch.ops.opensora_fast.masked_mse
    run(
        benchmark,
        lambda: torch.autograd.grad(op(p3, t3, ranges), [pred]),
        group=group,
        impl="torch.ops masked_mse alone, C++ autograd",
        role="part",
        nbytes=nbytes,
    )


@pytest.fixture(scope="module")
def adamw_setup():
    torch.manual_seed(0)
    model = tiny_11b()
    ema = copy.deepcopy(model).requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(1 for _ in model.parameters())
    group = f"optimizer step + EMA host cost, {n} tensors of 4 elements (11B layout, fp32), cpu, 1 thread"
    nbytes = sum(p.numel() * 4 * 8 for p in model.parameters())
    return group, model, ema, nbytes


def test_adamw_torch_fused_then_update_ema(benchmark, adamw_setup):
    group, model, ema, nbytes = adamw_setup
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        opt.step()
        update_ema(ema, model, opt, DECAY, sharded=False)

    run(benchmark, step, group=group, impl="torch AdamW(fused) + update_ema", role="baseline", nbytes=nbytes)


def test_adamw_fused_ema_attached(benchmark, adamw_setup):
    group, model, ema, nbytes = adamw_setup
    opt = FusedAdamW(model.parameters(), lr=1e-4)
    own_ema = copy.deepcopy(ema)  # held here: an attachment holds its EMA weakly
    opt.attach_ema(own_ema, model, decay=DECAY)
    run(benchmark, opt.step, group=group, impl="FusedAdamW, EMA attached", role="ours", nbytes=nbytes)
