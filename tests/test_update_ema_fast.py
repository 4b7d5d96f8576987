"""update_ema's native fast path (csrc/ema/ema_plan.cpp): armed after a validated
call, it runs the op straight from held lists while nothing the pairing or the
op's checks read has changed, and hands every change back to the validating
path. test_update_ema.py's cache tests run through it too (their first call arms
it); these pin what is particular to it."""

import copy
import gc
import sys
import weakref

import pytest
import torch
from helpers import assert_bitwise_equal
from test_update_ema import FakeZero, assert_models_equal, shard, zero_setup
from torch import nn

from opensora_fast import reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.utils import _ema
from opensora_fast.utils.train import update_ema

# The fast path needs the extension and CPython's dict version tags (up to 3.12).
ARMS = HAS_NATIVE and sys.version_info < (3, 13)


class _Count:
    """Counts the validating path's calls (the plan check), passing them through."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = _ema._Plan.still_valid

        def spy(plan, *a):
            self.n += 1
            return real(plan, *a)

        monkeypatch.setattr(_ema._Plan, "still_valid", spy)


def _both(ema, ema_ref, model, opt, decay=0.9):
    update_ema(ema, model, opt, decay=decay)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=decay)
    assert_models_equal(ema, ema_ref)


def test_armed_after_one_call_and_then_taken(monkeypatch):
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    g = torch.Generator().manual_seed(4)
    _both(ema, ema_ref, model, opt)
    assert (_ema._plans[ema].fast is not None) == ARMS
    count = _Count(monkeypatch)
    for decay in (0.5, 0.99, 0.9999):
        opt.step(g)  # the masters' values change in place: no re-validation needed
        _both(ema, ema_ref, model, opt, decay)
    assert count.n == (0 if ARMS else 3)


def test_every_step_bumps_the_ema_versions():
    model, ema, opt = zero_setup()
    update_ema(ema, model, opt, decay=0.9)
    before = ema.a.weight._version
    update_ema(ema, model, opt, decay=0.9)
    assert ema.a.weight._version == before + 1
    assert ema.pos_embed._version == 0  # skipped, as upstream


def test_an_attribute_set_each_step_keeps_the_fast_path(monkeypatch):
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _both(ema, ema_ref, model, opt)
    count = _Count(monkeypatch)
    for step in range(3):
        model.a.cached = torch.full((2,), float(step))  # what a forward may leave on a module
        model.train(step % 2 == 0)
        _both(ema, ema_ref, model, opt)
    assert count.n == (0 if ARMS else 3)


def test_requires_grad_flipped_after_arming():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    g = torch.Generator().manual_seed(3)
    _both(ema, ema_ref, model, opt)
    model.a.weight.requires_grad_(False)
    frozen = ema.a.weight.detach().clone()
    opt.step(g)  # the masters move: an EMA that is stepped moves with them
    _both(ema, ema_ref, model, opt)
    assert_bitwise_equal(ema.a.weight.detach(), frozen, "a.weight frozen: skipped")
    model.a.weight.requires_grad_(True)
    opt.step(g)
    _both(ema, ema_ref, model, opt)
    assert not torch.equal(ema.a.weight.detach(), frozen)


def test_master_storage_swapped_with_data():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _both(ema, ema_ref, model, opt)
    master = opt._map[id(model.a.weight)]
    master.data = torch.full_like(master, 8.0)  # same object, new storage
    _both(ema, ema_ref, model, opt, decay=0.5)
    assert bool((ema.a.weight.float() > 3).all())


def test_a_fresh_master_map_each_call(monkeypatch):
    # an optimizer whose getter builds a new dict every call: same masters
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    monkeypatch.setattr(opt, "get_working_to_master_map", lambda: dict(opt._map))
    _both(ema, ema_ref, model, opt)
    count = _Count(monkeypatch)
    _both(ema, ema_ref, model, opt)
    assert count.n == (0 if ARMS else 1)
    # ... and one master replaced in the fresh dict
    opt._map[id(model.b.bias)] = shard(torch.full((3,), 6.0), 3, 1)
    _both(ema, ema_ref, model, opt, decay=0.5)
    assert count.n == (1 if ARMS else 2)


def test_an_overlap_made_after_arming_is_refused():
    model, ema, opt = zero_setup()
    update_ema(ema, model, opt, decay=0.9)
    n = ema.b.bias.numel()
    ema.b.bias.data = ema.b.weight.data.reshape(-1)[:n]  # now shares memory with b.weight
    before = copy.deepcopy(ema)
    with pytest.raises(ValueError, match="overlap in memory"):
        update_ema(ema, model, opt, decay=0.9)
    assert_models_equal(ema, before)


def test_a_shape_or_dtype_made_wrong_after_arming_is_refused():
    model, ema, opt = zero_setup()
    update_ema(ema, model, opt, decay=0.9)
    before = copy.deepcopy(ema)
    ema.a.bias.data = torch.zeros(2).bfloat16()  # its master stays at 5 elements
    with pytest.raises(ValueError, match=r"has shape \[2\] but src\[\d+\] has shape \[5\]"):
        update_ema(ema, model, opt, decay=0.9)
    ema.a.bias.data = before.a.bias.data.double()
    with pytest.raises(TypeError, match="has dtype torch.float64"):
        update_ema(ema, model, opt, decay=0.9)
    ema.a.bias.data = before.a.bias.data.clone()
    assert_models_equal(ema, before)


def test_bad_decay_after_arming_is_refused():
    model, ema, opt = zero_setup()
    update_ema(ema, model, opt, decay=0.9)
    before = copy.deepcopy(ema)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
            update_ema(ema, model, opt, decay=bad)
    assert_models_equal(ema, before)


def test_the_reference_backend_chosen_after_arming_is_used(monkeypatch):
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _both(ema, ema_ref, model, opt)
    calls = []
    real = _ema.ema_update_
    monkeypatch.setattr(_ema, "ema_update_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    _both(ema, ema_ref, model, opt)
    assert calls == [1]


@pytest.mark.parametrize("seed", [0, 7])
def test_stochastic_matches_the_validating_path(monkeypatch, seed):
    model, ema, opt = zero_setup()
    slow = copy.deepcopy(ema)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.step(torch.Generator().manual_seed(1))
        update_ema(ema, model, opt, decay=0.9, rounding="stochastic", generator=g1)
        with monkeypatch.context() as m:
            m.setattr(_ema, "_arm", lambda *a: None)  # never armed: validates every step
            _ema._plans.pop(slow, None)
            update_ema(slow, model, opt, decay=0.9, rounding="stochastic", generator=g2)
    assert_models_equal(ema, slow)


def test_a_module_swapped_on_the_ema_side():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _both(ema, ema_ref, model, opt)
    for e in (ema, ema_ref):
        e.b = nn.Linear(13, 3).bfloat16().requires_grad_(False)
        for p in e.b.parameters():
            p.data = shard(torch.zeros(p.shape), 3, 1).bfloat16()
    _both(ema, ema_ref, model, opt, decay=0.5)
    assert bool((ema.b.weight != 0).any())


def test_plan_keeps_neither_model_alive_even_through_a_self_reference():
    model, ema, opt = zero_setup()
    ema.me = [ema]  # the root's __dict__ leads back to the root
    model.me = [model]
    update_ema(ema, model, opt, decay=0.9)
    update_ema(ema, model, opt, decay=0.9)
    gone_ema, gone_model = weakref.ref(ema), weakref.ref(model)
    del ema, model, opt
    gc.collect()
    assert gone_ema() is None and gone_model() is None


def test_another_optimizer_object_with_other_masters():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _both(ema, ema_ref, model, opt)
    opt2 = FakeZero(model, 3, 1)
    opt2.step(torch.Generator().manual_seed(9))
    _both(ema, ema_ref, model, opt2)
    _both(ema, ema_ref, model, opt)
