"""World size 1 (a process group of one, or none): the gathers and
CheckpointIO run no collective at all (every torch.distributed collective is
patched to raise) and give the upstream-faithful reference's results, bit
for bit, whatever the layout of shards and destinations."""

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import assert_bitwise_equal

from opensora_fast.reference.upstream import ckpt as ref
from opensora_fast.utils import _ckpt_gather, ckpt

_COLLECTIVES = (
    "gather",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "broadcast",
    "barrier",
    "reduce_scatter",
    "all_to_all",
)


class Net(torch.nn.Module):
    """fp32 and bf16 parameters, an empty one, a buffer, and (``scalar``) a
    0-dim one, which the reference cannot gather (upstream's remove_padding
    fails on it)."""

    def __init__(self, seed=0, scalar=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(7, 5, generator=g))
        self.h = torch.nn.Parameter(torch.randn(11, generator=g).bfloat16())
        self.s = torch.nn.Parameter(torch.randn(() if scalar else (1,), generator=g))
        self.e = torch.nn.Parameter(torch.zeros(0, 3))
        self.b = torch.nn.Parameter(torch.randn(3, 2, generator=g))
        self.register_buffer("steps", torch.tensor(4))


class Masters:
    """A ZeRO-like optimizer at world 1: a 1-D master per parameter, some longer
    than the parameter (zero padding past its elements), ``side_by_side``: in
    one buffer."""

    def __init__(self, model, group, side_by_side=False, pad=3):
        params = list(model.parameters())
        sizes = [p.numel() + (pad if i % 2 else 0) for i, p in enumerate(params)]
        flat = torch.zeros(sum(sizes)) if side_by_side else None
        self.w2m, self.param_to_pg, off = {}, {}, 0
        for p, n in zip(params, sizes):
            m = flat[off : off + n] if flat is not None else torch.zeros(n)
            off += n
            m[: p.numel()].copy_(p.detach().reshape(-1).float() * 1.5)
            self.w2m[id(p)] = m
            self.param_to_pg[p] = group

    def get_working_to_master_map(self):
        return self.w2m

    def state_dict(self):
        return {}


@pytest.fixture
def group_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _no_collectives(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran at world size 1")

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, refuse)
    monkeypatch.setattr(_ckpt_gather, "_all_gather_flat", refuse)


def _filled(pinned: dict) -> dict:
    for v in pinned.values():
        v.fill_(-7)
    return pinned


def _pinned_like(shapes: dict, net: torch.nn.Module, flat: bool) -> dict:
    entries = [(k, tuple(shapes.get(k, v.shape)), v.dtype) for k, v in net.state_dict().items()]
    if flat:
        return ckpt.CheckpointIO._pinned_dict(entries)
    return {k: torch.empty(s, dtype=dt) for k, s, dt in entries}


@pytest.mark.parametrize("sharding", ["ours", "upstream"])
@pytest.mark.parametrize("flat", [True, False])
def test_gathers_at_world_one_run_no_collective(group_of_one, monkeypatch, sharding, flat):
    shapes = ckpt.record_model_param_shape(Net())
    ema = Net(1)
    (ckpt if sharding == "ours" else ref).model_sharding(ema)
    want = _pinned_like(shapes, ema, flat=False)
    ref.model_gathering(ema, shapes, want)
    model = Net(2)
    for side_by_side in (False, True):
        opt = Masters(model, group_of_one, side_by_side)
        want_m = {n: torch.empty(p.shape) for n, p in model.named_parameters()}
        ref.master_weights_gathering(model, opt, want_m)

        with monkeypatch.context() as m:
            _no_collectives(m)
            got = _filled(_pinned_like(shapes, ema, flat))
            ckpt.model_gathering(ema, shapes, got, bucket_bytes=64)
            m_entries = [(n, tuple(p.shape), torch.float32) for n, p in model.named_parameters()]
            got_m = _filled(
                ckpt.CheckpointIO._pinned_dict(m_entries)
                if flat
                else {n: torch.empty(s, dtype=dt) for n, s, dt in m_entries}
            )
            ckpt.master_weights_gathering(model, opt, got_m, bucket_bytes=64)
        for k, v in want.items():
            assert_bitwise_equal(got[k], v, f"ema {k} sharding={sharding} flat={flat}")
        for k, v in want_m.items():
            assert_bitwise_equal(got_m[k], v, f"master {k} side_by_side={side_by_side}")


def test_world_one_still_checks_input(group_of_one, monkeypatch):
    shapes = ckpt.record_model_param_shape(Net())
    ema = Net(1)
    ckpt.model_sharding(ema)
    _no_collectives(monkeypatch)
    pinned = _pinned_like(shapes, ema, flat=True)
    pinned["w"] = torch.empty(5, 7)
    with pytest.raises(ValueError, match=r"pinned_state_dict\['w'\] has shape \[5, 7\], expected \[7, 5\]"):
        ckpt.model_gathering(ema, shapes, pinned)
    with pytest.raises(TypeError, match="bucket_bytes must be an int"):
        ckpt.model_gathering(ema, shapes, _pinned_like(shapes, ema, flat=True), bucket_bytes=1.5)


def test_master_weights_without_a_process_group():
    assert not dist.is_initialized()
    model = Net(3, scalar=True)
    opt = Masters(model, None)
    got = _filled({n: torch.empty(p.shape) for n, p in model.named_parameters()})
    ckpt.master_weights_gathering(model, opt, got)
    for n, p in model.named_parameters():
        want = opt.w2m[id(p)][: p.numel()].reshape(p.shape)
        assert_bitwise_equal(got[n], want, n)


def test_checkpointio_at_world_one_runs_no_collective(group_of_one, monkeypatch, tmp_path):
    shapes = ckpt.record_model_param_shape(Net(scalar=True))
    model, ema = Net(4, scalar=True), Net(5, scalar=True)
    ckpt.model_sharding(ema)
    full = copy.deepcopy(ema)
    opt = Masters(model, group_of_one)
    io = ckpt.CheckpointIO()
    with monkeypatch.context() as m:
        _no_collectives(m)
        path = io.save(
            None,
            str(tmp_path),
            model=model,
            ema=ema,
            optimizer=opt,
            epoch=0,
            step=1,
            global_step=1,
            actual_update_step=1,
            ema_shape_dict=shapes,
            include_master_weights=True,
        )
        io.close()
    from safetensors.torch import load_file

    got = load_file(f"{path}/ema.safetensors")
    for k, v in full.state_dict().items():
        assert_bitwise_equal(got[k], v.reshape(-1)[: got[k].numel()].reshape(got[k].shape), k)
    masters = load_file(f"{path}/master.safetensors")
    for n, p in model.named_parameters():
        assert_bitwise_equal(masters[n], opt.w2m[id(p)][: p.numel()].reshape(p.shape), n)
