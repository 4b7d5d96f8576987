"""The gathers' plan cache: a second model_gathering / master_weights_gathering
of the same model into the same buffers reuses what the first derived (its
items, checks and bucket plans) after a cheap check, and derives afresh after
any change that the plan depends on; the results are bit for bit those of the
upstream-faithful reference either way. World 1 in process, world 2 on gloo
(one rank re-plans while the other reuses: the same collectives still run)."""

import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_bitwise_equal, free_port

from opensora_fast.reference.upstream import ckpt as ref
from opensora_fast.utils import _ckpt_gather, _ckpt_shard, ckpt


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Linear(5, 3)
        self.h = torch.nn.Parameter(torch.randn(11, generator=g).bfloat16())
        self.w = torch.nn.Parameter(torch.randn(7, 5, generator=g))
        self.register_buffer("steps", torch.tensor(4))
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(3, 5, generator=g))
            self.a.bias.copy_(torch.randn(3, generator=g))


class Zero:
    """A ZeRO-like optimizer: one 1-D master shard per parameter (zero padded)."""

    def __init__(self, model, group=None):
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.w2m, self.param_to_pg = {}, {}
        for p in model.parameters():
            flat = p.detach().float().reshape(-1) * 1.5 + 0.25
            flat = torch.nn.functional.pad(flat, [0, (world - flat.numel() % world) % world])
            s = flat.numel() // world
            self.w2m[id(p)] = flat[rank * s : (rank + 1) * s].clone()
            self.param_to_pg[p] = group if group is not None else dist.group.WORLD

    def get_working_to_master_map(self):
        return self.w2m


class Counter:
    """Counts the derivations (item building) of both gathers."""

    def __init__(self, monkeypatch):
        self.model = self.master = 0
        model_items, master_items = _ckpt_shard._model_items, _ckpt_shard._master_items

        def count_model(*a, **k):
            self.model += 1
            return model_items(*a, **k)

        def count_master(*a, **k):
            self.master += 1
            return master_items(*a, **k)

        monkeypatch.setattr(_ckpt_shard, "_model_items", count_model)
        monkeypatch.setattr(_ckpt_shard, "_master_items", count_master)


def _pinned(shapes, net, flat):
    entries = [(k, tuple(shapes.get(k, v.shape)), v.dtype) for k, v in net.state_dict().items()]
    if flat:
        return ckpt.CheckpointIO._pinned_dict(entries)
    return {k: torch.empty(s, dtype=dt) for k, s, dt in entries}


def _master_pinned(model):
    return {n: torch.empty(p.shape) for n, p in model.named_parameters()}


def _check_ema(ema, shapes, got, what):
    want = {k: torch.empty_like(v) for k, v in got.items()} if got is not None else None
    ref.model_gathering(ema, shapes, want)
    if dist.get_rank() == 0:
        for k, v in want.items():
            assert_bitwise_equal(got[k], v, f"{what}: {k}")


def _check_master(model, zero, got, what):
    want = {k: torch.empty_like(v) for k, v in got.items()} if got is not None else None
    ref.master_weights_gathering(model, zero, want)
    if dist.get_rank() == 0:
        for k, v in want.items():
            assert_bitwise_equal(got[k], v, f"{what}: {k}")


def _ema_changes(ema, shapes, pinned):
    """(what, change): each returns the (shapes, pinned) to gather with next."""

    def new_param():
        ema.h = torch.nn.Parameter(torch.randn_like(ema.h.data))
        return shapes, pinned

    def new_data():
        ema.w.data = torch.randn_like(ema.w.data)
        return shapes, pinned

    def new_buffer():
        ema.steps = torch.tensor(9)
        return shapes, pinned

    def new_submodule():
        ema.a = torch.nn.Linear(5, 3)
        ckpt.model_sharding(ema.a)
        return shapes, pinned

    # the destinations exist on rank 0 only: there it re-plans, elsewhere it reuses
    def new_pinned_dict():
        return shapes, pinned and {k: torch.empty_like(v) for k, v in pinned.items()}

    def new_pinned_entry():
        out = pinned and dict(pinned)
        if out:
            out["w"] = torch.empty_like(pinned["w"])
        return shapes, out

    def pinned_entry_data():
        if pinned:
            pinned["w"].data = torch.empty_like(pinned["w"])
        return shapes, pinned

    def new_shape_dict_same_shapes():
        return dict(shapes), pinned

    return [
        ("a parameter replaced", new_param),
        ("a parameter's data replaced", new_data),
        ("a buffer replaced", new_buffer),
        ("a submodule replaced", new_submodule),
        ("a new pinned dict", new_pinned_dict),
        ("a pinned entry replaced", new_pinned_entry),
        ("a pinned entry's data replaced", pinned_entry_data),
        ("an equal shape dict", new_shape_dict_same_shapes),
    ]


def _ema_cases(monkeypatch, flat):
    """Every rank: one gather derives, the next reuses, each change re-derives."""
    count = Counter(monkeypatch)
    ema = Net(1)
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    pinned = _pinned(shapes, ema, flat) if dist.get_rank() == 0 else None
    ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=64)
    assert count.model == 1
    for _ in range(2):
        ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=64)
    assert count.model == 1, "the plan was not reused"
    _check_ema(ema, shapes, pinned, "reused")
    for what, change in _ema_changes(ema, shapes, pinned):
        before = count.model
        shapes_now, pinned_now = change()
        for v in (pinned_now or {}).values():
            v.fill_(-3)
        ckpt.model_gathering(ema, shapes_now, pinned_now, bucket_bytes=64)
        replans = what != "an equal shape dict" and (dist.get_rank() == 0 or "pinned" not in what)
        expect = before + replans
        assert count.model == expect, what
        _check_ema(ema, shapes_now, pinned_now, what)
        pinned = pinned_now
        ckpt.model_gathering(ema, shapes_now, pinned, bucket_bytes=64)
        assert count.model == expect, f"not reused after: {what}"


def _local_world():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.fixture
def world_one():
    _local_world()
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("flat", [True, False])
def test_model_gathering_reuses_and_replans(world_one, monkeypatch, flat):
    _ema_cases(monkeypatch, flat)


def test_a_changed_shape_dict_still_raises(world_one, monkeypatch):
    ema = Net(1)
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    pinned = _pinned(shapes, ema, True)
    ckpt.model_gathering(ema, shapes, pinned)
    bad = dict(shapes, w=torch.Size([5, 7]))
    with pytest.raises(ValueError, match=r"pinned_state_dict\['w'\] has shape \[7, 5\], expected \[5, 7\]"):
        ckpt.model_gathering(ema, bad, pinned)
    del bad["w"]
    with pytest.raises(ValueError, match="model_shape_dict has no entry for parameter 'w'"):
        ckpt.model_gathering(ema, bad, pinned)
    pinned["w"] = torch.empty(5, 7)
    with pytest.raises(ValueError, match=r"pinned_state_dict\['w'\] has shape \[5, 7\]"):
        ckpt.model_gathering(ema, shapes, pinned)


def test_new_options_make_new_plans_not_new_items(world_one, monkeypatch):
    count = Counter(monkeypatch)
    made = []
    local_plan = _ckpt_gather.LocalPlan
    monkeypatch.setattr(_ckpt_shard, "LocalPlan", lambda items: made.append(1) or local_plan(items))
    ema = Net(1)
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    pinned = _pinned(shapes, ema, True)
    for bb in (64, 64, 128, 128):
        ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=bb)
    assert count.model == 1 and len(made) == 2 * 2  # a plan per (dtype group, options)
    _check_ema(ema, shapes, pinned, "options")


def test_the_cache_keeps_no_buffer_alive(world_one):
    ema = Net(1)
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    model = Net(2)
    zero = Zero(model)
    pinned, mp_ = _pinned(shapes, ema, True), _master_pinned(model)
    ckpt.model_gathering(ema, shapes, pinned)
    ckpt.master_weights_gathering(model, zero, mp_)
    refs = [weakref.ref(t) for t in list(pinned.values()) + list(mp_.values()) + list(zero.w2m.values())]
    del pinned, mp_, zero
    gc.collect()
    assert all(r() is None for r in refs), "the plan cache holds a destination or master shard"
    m = weakref.ref(ema)
    del ema
    gc.collect()
    assert m() is None, "the plan cache keeps the model alive"


def _master_cases(monkeypatch):
    count = Counter(monkeypatch)
    model = Net(2)
    zero = Zero(model)
    pinned = _master_pinned(model) if dist.get_rank() == 0 else None
    for _ in range(3):
        ckpt.master_weights_gathering(model, zero, pinned, bucket_bytes=64)
    assert count.master == 1, "the plan was not reused"
    _check_master(model, zero, pinned, "reused")

    def new_master():
        zero.w2m[id(model.w)] = zero.w2m[id(model.w)].clone() * 2

    def master_data():
        zero.w2m[id(model.h)].data = zero.w2m[id(model.h)].clone() - 1

    def new_group():
        zero.param_to_pg[model.w] = dist.new_group(list(range(dist.get_world_size())))

    def new_param_shape():
        model.w.data = model.w.data.reshape(5, 7)

    def new_pinned_dict():  # rank 0 only re-plans
        return dist.get_rank() == 0

    changes = [new_master, master_data, new_group, new_param_shape, new_pinned_dict]
    for change in changes:
        before = count.master
        replans = change() is not False
        if change in (new_param_shape, new_pinned_dict) and dist.get_rank() == 0:
            pinned = _master_pinned(model)
        for v in (pinned or {}).values():
            v.fill_(-3)
        ckpt.master_weights_gathering(model, zero, pinned, bucket_bytes=64)
        assert count.master == before + replans, change.__name__
        _check_master(model, zero, pinned, change.__name__)
        ckpt.master_weights_gathering(model, zero, pinned, bucket_bytes=64)
        assert count.master == before + replans, f"not reused after {change.__name__}"


def test_master_weights_gathering_reuses_and_replans(world_one, monkeypatch):
    _master_cases(monkeypatch)


def _worker(rank, world, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with pytest.MonkeyPatch.context() as m:
            made = []
            make = _ckpt_gather.GatherPlan.make
            m.setattr(_ckpt_gather.GatherPlan, "make", staticmethod(lambda *a, **k: made.append(1) or make(*a, **k)))
            # rank 0 re-plans at each change, rank 1 reuses: the collectives still pair up
            for flat in (True, False):
                _ema_cases(m, flat)
            _master_cases(m)
            assert made, "no gather plan was made"
    finally:
        dist.destroy_process_group()


def test_reuse_on_gloo_world_two():
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(2, free_port()), nprocs=2, join=True, start_method=method)
