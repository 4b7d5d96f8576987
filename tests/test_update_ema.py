"""Drop-in update_ema vs the reference port of upstream's, on a small ZeRO-like setup."""

import copy
import sys
import types

import pytest
import torch
from helpers import assert_bitwise_equal
from torch import nn

import opensora_fast
from opensora_fast import reference
from opensora_fast.utils.train import update_ema


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(5, 7))
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 3)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.scale = nn.Parameter(torch.randn(1))  # 1 element: pure padding on most ranks


def shard(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Open-Sora's model_sharding layout: flatten, zero-pad to a multiple of world, take chunk[rank]."""
    flat = t.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % world)])
    return flat.chunk(world)[rank].clone()


class FakeZero:
    """Stands in for a ZeRO optimizer: fp32 master shards of the bf16 working params."""

    def __init__(self, model, world, rank):
        self._map = {id(p): shard(p.detach().float(), world, rank) for p in model.parameters()}

    def get_working_to_master_map(self):
        return self._map

    def step(self, gen):
        for m in self._map.values():
            m.add_(torch.randn(m.shape, generator=gen) * 0.1)


def zero_setup(world=3, rank=1, seed=0):
    torch.manual_seed(seed)
    model = Net().to(torch.bfloat16)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p in ema.parameters():
        p.data = shard(p.data, world, rank)
    return model, ema, FakeZero(model, world, rank)


def assert_models_equal(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert_bitwise_equal(pa.data, pb.data, na)


def test_sharded_matches_reference_over_steps():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    g = torch.Generator().manual_seed(1)
    before = copy.deepcopy(ema)
    for decay in (0.9, 0.99, 0.9999):
        opt.step(g)
        update_ema(ema, model, opt, decay=decay)
        reference.upstream.train.update_ema(ema_ref, model, opt, decay=decay)
        assert_models_equal(ema, ema_ref)
    # skipped: pos_embed and params without requires_grad; the rest moved
    assert torch.equal(ema.pos_embed, before.pos_embed)
    assert torch.equal(ema.frozen, before.frozen)
    assert not torch.equal(ema.a.weight, before.a.weight)


def test_unsharded_mixed_dtypes_matches_reference():
    torch.manual_seed(0)
    model = Net()
    model.a.to(torch.bfloat16)  # bf16 and fp32 params side by side
    ema = copy.deepcopy(model).requires_grad_(False)
    ema.b.to(torch.bfloat16)
    ema.a.float()  # (bf16/bf16 pairs are covered with their torch quirk in test_ema.py)
    ema_ref = copy.deepcopy(ema)
    for _step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ema, model, decay=0.99, sharded=False)
        reference.upstream.train.update_ema(ema_ref, model, decay=0.99, sharded=False)
        assert_models_equal(ema, ema_ref)


def test_pairing_follows_changed_parameters():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    update_ema(ema, model, opt, decay=0.9)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.9)
    # 1) `.data` reassigned in place of the same Parameter objects
    for e in (ema, ema_ref):
        e.b.bias.data = e.b.bias.data + 1
    # 2) requires_grad toggled: now skipped
    model.b.weight.requires_grad_(False)
    # 3) a Parameter object replaced, with a new master shard for it
    model.a.bias = nn.Parameter(torch.randn(13).bfloat16())
    opt._map[id(model.a.bias)] = shard(model.a.bias.detach().float(), 3, 1)
    for _ in range(2):
        update_ema(ema, model, opt, decay=0.9)
        reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.9)
        assert_models_equal(ema, ema_ref)
    # 4) a new optimizer (new master map object)
    opt2 = FakeZero(model, 3, 1)
    update_ema(ema, model, opt2, decay=0.9)
    reference.upstream.train.update_ema(ema_ref, model, opt2, decay=0.9)
    assert_models_equal(ema, ema_ref)


def test_stochastic_rounding_option_moves_a_bf16_ema():
    model, ema, opt = zero_setup()
    for m in opt._map.values():
        m.fill_(2.0)
    for p in ema.parameters():
        p.data.fill_(1.0)  # bf16 ulp at 1.0 is 2**-7: increments of 1e-4 round away
    compat, sr = copy.deepcopy(ema), copy.deepcopy(ema)
    start = copy.deepcopy(ema)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        update_ema(compat, model, opt, decay=0.9999)
        update_ema(sr, model, opt, decay=0.9999, rounding="stochastic", generator=g)
    assert torch.equal(compat.a.weight, start.a.weight)  # rounds every increment away
    assert not torch.equal(sr.a.weight, start.a.weight)


def test_fp32_model_sharded_with_a_plain_optimizer():
    # upstream never asks an fp32 model's optimizer for masters, so any optimizer works
    torch.manual_seed(0)
    model = Net()
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_ref = copy.deepcopy(ema)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    update_ema(ema, model, opt, decay=0.9)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.9)
    assert_models_equal(ema, ema_ref)


def test_errors_are_clear():
    model, ema, opt = zero_setup()
    with pytest.raises(ValueError, match="get_working_to_master_map"):
        update_ema(ema, model, None)
    with pytest.raises(ValueError, match="got SGD"):
        update_ema(ema, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="rounding must be one of"):
        update_ema(ema, model, opt, rounding="nearest")
    del ema.b
    with pytest.raises(KeyError, match="'b.weight'"):
        update_ema(ema, model, opt)


def test_patch_opensora_replaces_upstream_function(monkeypatch):
    fake_train = types.ModuleType("opensora.utils.train")
    fake_train.update_ema = lambda *a, **k: None
    for name, mod in {
        "opensora": types.ModuleType("opensora"),
        "opensora.utils": types.ModuleType("opensora.utils"),
        "opensora.utils.train": fake_train,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    original = fake_train.update_ema
    patched = opensora_fast.patch_opensora()
    try:
        assert "opensora.utils.train.update_ema" in patched
        assert fake_train.update_ema is update_ema
    finally:
        opensora_fast.unpatch_opensora()  # leave no patch record behind for later tests
    assert fake_train.update_ema is original


def test_patch_opensora_without_opensora(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensora", None)  # import fails
    assert opensora_fast.patch_opensora() == []
    with pytest.raises(ImportError):
        opensora_fast.patch_opensora(strict=True)


# ------------------------------------------------- reliability round two (issue 17)


class Flat(nn.Module):
    """1-D parameters only: with world 1 a master shard has its parameter's shape,
    so the same EMA works with sharded=True (fp32 masters) and sharded=False (bf16 params)."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.randn(11))
        self.v = nn.Parameter(torch.randn(6))


def test_switching_sharded_on_one_ema_rederives_the_pairing():
    torch.manual_seed(3)
    model = Flat().to(torch.bfloat16)
    ema = copy.deepcopy(model).requires_grad_(False).float()
    ema_ref = copy.deepcopy(ema)
    opt = FakeZero(model, 1, 0)
    g = torch.Generator().manual_seed(0)
    opt.step(g)  # masters now differ from the bf16 params
    for sharded in (True, False, True, False):
        update_ema(ema, model, opt, decay=0.5, sharded=sharded)
        reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.5, sharded=sharded)
        assert_models_equal(ema, ema_ref)


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(5, 7)
        self.cols = nn.Parameter(torch.randn(4, 9))


def _strided_pair(layout: str):
    """(model fp32, ema bf16) whose parameters are not contiguous, upstream-style."""
    torch.manual_seed(5)
    model = Strided()
    ema = copy.deepcopy(model).requires_grad_(False).to(torch.bfloat16)
    for m in (model, ema) if layout != "ema only" else (ema,):
        m.conv.weight.data = m.conv.weight.data.contiguous(memory_format=torch.channels_last)
        m.lin.weight.data = m.lin.weight.data.t().contiguous().t()  # transposed storage
        # not dense at all: every other column of a wider buffer
        wide = torch.zeros(4, 18, dtype=m.cols.dtype)
        wide[:, ::2] = m.cols.data
        m.cols.data = wide[:, ::2]
    if layout == "model only":
        for p in ema.parameters():
            p.data = p.data.contiguous()
    return model, ema


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("layout", ["both", "ema only", "model only"])
def test_non_contiguous_parameters_run_as_upstream(layout, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    model, ema = _strided_pair(layout)
    ema_ref = copy.deepcopy(ema)
    strides = [p.stride() for p in ema.parameters()]
    for _step in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape))
        update_ema(ema, model, decay=0.9, sharded=False)
        reference.upstream.train.update_ema(ema_ref, model, decay=0.9, sharded=False)
        assert_models_equal(ema, ema_ref)
    assert [p.stride() for p in ema.parameters()] == strides  # written in place, layout kept
    # stochastic rounding takes the same paths
    update_ema(ema, model, decay=0.9, sharded=False, rounding="stochastic")


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [0.9999, 0.2, 1])
def test_zero_dim_tensor_decay_as_upstream(value, dtype, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    if dtype == torch.int64 and value != 1:
        pytest.skip("an integer decay tensor holds 0 or 1")
    model, ema, opt = zero_setup()
    ema.float()  # an fp32 EMA shows every alpha difference (a bf16 one rounds most away)
    ema_ref = copy.deepcopy(ema)
    decay = torch.tensor(value, dtype=dtype)  # 0.2 in bf16/fp16: upstream computes 1 - decay in that dtype
    update_ema(ema, model, opt, decay=decay)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=decay)
    assert_models_equal(ema, ema_ref)


def test_bad_tensor_decay_is_a_type_error():
    model, ema, opt = zero_setup()
    before = copy.deepcopy(ema)
    for decay, text in [
        (torch.tensor(True), "got a torch.bool tensor of shape []"),
        (torch.tensor([0.9]), "got a torch.float32 tensor of shape [1]"),
        (torch.tensor(0.9j), "got a torch.complex64 tensor of shape []"),
    ]:
        with pytest.raises(
            TypeError,
            match=r"update_ema: decay must be a real number or a 0-dim real tensor, "
            + text.replace("[", r"\[").replace("]", r"\]"),
        ):
            update_ema(ema, model, opt, decay=decay)
    with pytest.raises(TypeError, match="decay must be a real number, got bool"):
        update_ema(ema, model, opt, decay=True)
    assert_models_equal(ema, before)


# ------------------------------------------------- the pairing cache's fingerprint (issue 22)


def _step_both(ema, ema_ref, model, opt, **kw):
    update_ema(ema, model, opt, decay=0.9, **kw)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.9, **kw)
    assert_models_equal(ema, ema_ref)


def test_cache_sees_a_parameter_renamed_in_place():
    # same object, same dict length and order, new key: the pairing is by name
    model, ema, opt = zero_setup()
    _step_both(ema, copy.deepcopy(ema), model, opt)
    model.b._parameters["b2"] = model.b._parameters.pop("bias")
    with pytest.raises(KeyError, match="'b.b2'"):
        update_ema(ema, model, opt, decay=0.9)


def test_cache_sees_parameters_written_into_empty_slots_and_swapped_submodules():
    model, ema, opt = zero_setup()
    for m in (model, ema):
        m.extra = nn.Module()  # no parameters yet
    ema_ref = copy.deepcopy(ema)
    _step_both(ema, ema_ref, model, opt)
    # a parameter written straight into an empty dict, on both sides
    model.extra._parameters["w"] = nn.Parameter(torch.randn(4).bfloat16())
    opt._map[id(model.extra.w)] = shard(model.extra.w.detach().float(), 3, 1)
    for e in (ema, ema_ref):
        e.extra._parameters["w"] = nn.Parameter(torch.zeros(2).bfloat16(), requires_grad=False)
    _step_both(ema, ema_ref, model, opt)
    assert bool((ema.extra.w != 0).any())
    # a submodule swapped behind the registration hooks
    new = nn.Linear(13, 3).bfloat16()
    model._modules["b"] = new
    for p in new.parameters():
        opt._map[id(p)] = shard(p.detach().float(), 3, 1) + 5
    _step_both(ema, ema_ref, model, opt)


def test_cache_sees_slot_dicts_rebound_to_fresh_ones():
    # the old dicts are left as they were: only the modules' attributes change
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _step_both(ema, ema_ref, model, opt)
    old = model.b._parameters
    model.b._parameters = {k: nn.Parameter(v.detach().clone()) for k, v in old.items()}
    for p in model.b._parameters.values():
        opt._map[id(p)] = shard(p.detach().float(), 3, 1) + 7
    _step_both(ema, ema_ref, model, opt)
    assert dict(old) == {k: v for k, v in old.items()}  # untouched
    new = nn.Linear(13, 3).bfloat16()
    model._modules = {**model._modules, "b": new}
    for p in new.parameters():
        opt._map[id(p)] = shard(p.detach().float(), 3, 1) - 3
    _step_both(ema, ema_ref, model, opt)


def test_cache_sees_another_model_a_dtype_change_and_a_resize():
    model, ema, opt = zero_setup()
    ema_ref = copy.deepcopy(ema)
    _step_both(ema, ema_ref, model, opt)
    # another model object for the same EMA (its own masters)
    model2 = copy.deepcopy(model)
    opt2 = FakeZero(model2, 3, 1)
    opt2.step(torch.Generator().manual_seed(2))
    _step_both(ema, ema_ref, model2, opt2)
    # ... and unsharded, where no master map tells the models apart
    fp32, fp32_ema = Flat(), Flat().requires_grad_(False)
    fp32_ref = copy.deepcopy(fp32_ema)
    _step_both(fp32_ema, fp32_ref, fp32, None, sharded=False)
    _step_both(fp32_ema, fp32_ref, Flat(), None, sharded=False)
    # a parameter made fp32 in place: sharded update_ema now takes the parameter itself
    model2.a.bias.data = shard(torch.randn(13), 3, 1)
    _step_both(ema, ema_ref, model2, opt2)
    # resized in place on both sides (the op reads each tensor afresh)
    model2.a.bias.data = torch.randn(7)
    for e in (ema, ema_ref):
        e.a.bias.data = torch.zeros(7).bfloat16()
    _step_both(ema, ema_ref, model2, opt2)


# ---- parameters and masters replaced behind the registration hooks ----------------


class _Opt:
    def __init__(self, m):
        self.map = {id(p): p.detach().float().clone() for p in m.parameters()}

    def get_working_to_master_map(self):
        return self.map


def _models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).bfloat16()
    ema = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).bfloat16()
    return model, ema, _Opt(model)


def _check_against_reference(model, ema, opt):
    ema_ref = copy.deepcopy(ema)
    update_ema(ema, model, opt, decay=0.5)
    reference.upstream.train.update_ema(ema_ref, model, opt, decay=0.5)
    for (n, a), (_, b) in zip(ema.named_parameters(), ema_ref.named_parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), n)


def test_update_ema_sees_parameters_replaced_behind_the_hook():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    new = torch.nn.Parameter(torch.randn(3, 4).bfloat16())
    model[0]._parameters["weight"] = new  # no registration hook fires
    opt.map[id(new)] = torch.full((3, 4), 7.0)
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].weight.float() > 3).all())  # moved towards the new master (7)


def test_update_ema_after_del_bias_and_ema_param_replaced():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    del model[1].bias
    _check_against_reference(model, ema, opt)
    ema[0]._parameters["bias"] = torch.nn.Parameter(torch.zeros(3).bfloat16())
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].bias != 0).any())


def test_update_ema_sees_a_master_replaced_in_place_in_the_map():
    model, ema, opt = _models()
    _check_against_reference(model, ema, opt)
    w = model[0].weight
    opt.map[id(w)] = torch.full((3, 4), -9.0)  # same dict, same length, new tensor
    _check_against_reference(model, ema, opt)
    assert bool((ema[0].weight.float() < -3).all())


def test_cached_pairing_keeps_no_model_alive():
    import gc
    import weakref

    model, ema, opt = _models()
    update_ema(ema, model, opt, decay=0.5)
    gone = weakref.ref(ema)
    del ema
    gc.collect()
    assert gone() is None
