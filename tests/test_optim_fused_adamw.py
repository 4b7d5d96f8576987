"""opensora_fast.optim.FusedAdamW: torch AdamW parity, state dicts, the attached
EMA (plain and under a minimal ZeRO wrapper), bad input."""

import copy
import math

import pytest
import torch
from helpers import assert_bitwise_equal
from test_adamw_ema import assert_master_close
from torch import nn

from opensora_fast.optim import FusedAdamW, attach_ema, attached_optimizer, fused_ema_step_taken
from opensora_fast.utils.train import update_ema


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(13, 37)
        self.b = nn.Linear(37, 4099 // 37)
        self.scale = nn.Parameter(torch.randn(128, generator=g))
        self.pos_embed = nn.Parameter(torch.randn(5, generator=g))  # update_ema skips it
        self.frozen = nn.Parameter(torch.randn(7, generator=g), requires_grad=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.to(dtype)


def set_grads(params, step, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def groups_of(model, lr2):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    return [{"params": decay}, {"params": rest, "lr": lr2, "weight_decay": 0.0}]


CONFIGS = {
    "wd": dict(lr=1e-3, weight_decay=0.1),
    "no-wd": dict(lr=2e-3, weight_decay=0.0),
    "amsgrad": dict(lr=1e-3, weight_decay=0.05, amsgrad=True),
    "maximize": dict(lr=1e-3, maximize=True, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_100_steps_step_for_step_vs_torch_adamw_foreach(cfg):
    # Each step from the same state: m, v bit for bit, masters within
    # ulp(p) + 3 ulp(update) (torch's CPU sqrt is not correctly rounded); then
    # torch continues from ours. Two groups with different lr.
    ours_m, theirs_m = Net(), Net()
    ours = FusedAdamW(groups_of(ours_m, 5e-3), **CONFIGS[cfg])
    theirs = torch.optim.AdamW(groups_of(theirs_m, 5e-3), foreach=True, **CONFIGS[cfg])
    ps, qs = list(ours_m.parameters()), list(theirs_m.parameters())
    for step in range(100):
        set_grads(ps, step)
        set_grads(qs, step)
        decayed = []
        for group in theirs.param_groups:
            decayed += [p.detach() * torch.tensor(1 - group["lr"] * group["weight_decay"]) for p in group["params"]]
        ours.step()
        theirs.step()
        qflat = [p for g in theirs.param_groups for p in g["params"]]
        pflat = [p for g in ours.param_groups for p in g["params"]]
        for i, (p, q, d) in enumerate(zip(pflat, qflat, decayed)):
            assert_master_close(p.detach(), q.detach(), d, f"step {step} param {i}")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                if key in theirs.state[q]:
                    assert_bitwise_equal(ours.state[p][key], theirs.state[q][key], f"step {step} {key} {i}")
            with torch.no_grad():
                q.copy_(p)


def test_trajectories_stay_close_over_100_steps():
    ours_m, theirs_m = Net(), Net()
    ours = FusedAdamW(ours_m.parameters(), lr=1e-3, weight_decay=0.1)
    theirs = torch.optim.AdamW(theirs_m.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    for step in range(100):
        set_grads(ours_m.parameters(), step)
        set_grads(theirs_m.parameters(), step)
        ours.step()
        theirs.step()
    for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # 100 steps of lr 1e-3: drift far below lr * 1e-3
        if p.requires_grad:  # the moments do not depend on p: bit for bit all along
            assert_bitwise_equal(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"])
            assert_bitwise_equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


def test_state_dict_round_trip_with_torch_adamw():
    a_m, b_m = Net(), Net()
    torch_opt = torch.optim.AdamW(b_m.parameters(), lr=1e-3, amsgrad=True)
    for step in range(3):
        set_grads(b_m.parameters(), step)
        torch_opt.step()
    a_m.load_state_dict(b_m.state_dict())
    ours = FusedAdamW(a_m.parameters(), lr=1e-3, amsgrad=True)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    sd = ours.state_dict()
    assert sd["param_groups"][0].keys() == torch_opt.state_dict()["param_groups"][0].keys()
    for step in range(3, 6):  # both continue from the same state
        set_grads(a_m.parameters(), step)
        set_grads(b_m.parameters(), step)
        ours.step()
        torch_opt.step()
    back = torch.optim.AdamW(Net().parameters(), lr=1e-3, amsgrad=True)
    back.load_state_dict(ours.state_dict())  # and ours loads into torch's
    for i, (s, t) in enumerate(zip(ours.state_dict()["state"].values(), torch_opt.state_dict()["state"].values())):
        assert s.keys() == t.keys()
        assert float(s["step"]) == float(t["step"]) == 6.0
        assert s["step"].device.type == "cpu" and s["step"].dtype == torch.float32
        assert_bitwise_equal(s["exp_avg"], t["exp_avg"], f"exp_avg {i}")
    assert float(back.state_dict()["state"][0]["step"]) == 6.0


def test_fused_checkpoint_step_on_device_is_moved_to_cpu():
    m = Net()
    ours = FusedAdamW(m.parameters())
    set_grads(m.parameters(), 0)
    ours.step()
    sd = ours.state_dict()
    sd["param_groups"][0]["fused"] = True  # as torch's fused AdamW saves it
    for s in sd["state"].values():
        s["step"] = s["step"].to(torch.float64)  # some other dtype/device than ours
    ours.load_state_dict(sd)
    assert all(s["step"].dtype == torch.float32 and s["step"].device.type == "cpu" for s in ours.state.values())
    ours.step()


# ---------------------------------------------------------------- EMA attached


class MiniZero:
    """The interface of ColossalAI's low-level ZeRO that update_ema and
    attach_ema use, one rank of `world` simulated: working params (bf16),
    fp32 master shards (flatten, zero-pad to a multiple of world, chunk[rank]),
    get_working_to_master_map(), param_to_pg, and .optim, the inner optimizer."""

    def __init__(self, model, make_inner, world=1, rank=0):
        self.world, self.rank = world, rank
        self.working = [p for p in model.parameters() if p.requires_grad]
        self.masters = [self.shard(p).float() for p in self.working]
        self._map = {id(p): m for p, m in zip(self.working, self.masters)}
        self.param_to_pg = {p: None for p in self.working}
        self.optim = make_inner(self.masters)

    def shard(self, t):
        n = -(-t.numel() // self.world)
        flat = torch.zeros(n * self.world, dtype=t.dtype)
        flat[: t.numel()] = t.detach().reshape(-1)
        return flat[self.rank * n : (self.rank + 1) * n].clone()

    def get_working_to_master_map(self):
        return self._map

    def replace(self, old, new):
        """A working parameter replaced by `new`: a new master takes the old one's place and state."""
        i = next(k for k, p in enumerate(self.working) if p is old)
        m_old = self.masters[i]
        m_new = self.shard(new).float()
        for group in self.optim.param_groups:
            group["params"] = [m_new if q is m_old else q for q in group["params"]]
        self.optim.state[m_new] = self.optim.state.pop(m_old)
        self.working[i], self.masters[i] = new, m_new
        del self._map[id(old)]
        self._map[id(new)] = m_new

    def step(self):
        for p, m in zip(self.working, self.masters):
            m.grad = self.shard(p.grad).float() if p.grad is not None else None
        self.optim.step()
        with torch.no_grad():
            for p, m in zip(self.working, self.masters):
                n = m.numel()
                lo = self.rank * n
                flat = p.data.view(-1)
                k = max(0, min(n, flat.numel() - lo))
                flat[lo : lo + k].copy_(m[:k].to(p.dtype))


def sharded_ema(model, world=1, rank=0):
    """EMA model with each parameter replaced by its shard (model_sharding's layout)."""
    ema = copy.deepcopy(model)
    for mod in ema.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            n = -(-p.numel() // world)
            flat = torch.zeros(n * world, dtype=p.dtype)
            flat[: p.numel()] = p.detach().reshape(-1)
            mod._parameters[name] = nn.Parameter(flat[rank * n : (rank + 1) * n].clone(), requires_grad=False)
    return ema


@pytest.mark.parametrize("rounding", ["compat", "stochastic"])
@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
def test_zero_bf16_ema_bit_identical_to_update_ema_on_the_fused_masters(rounding, world, rank):
    model = Net(torch.bfloat16)
    twin = copy.deepcopy(model)
    zero = MiniZero(model, lambda ms: FusedAdamW(ms, lr=1e-3, weight_decay=0.1), world, rank)
    ref_zero = MiniZero(twin, lambda ms: torch.optim.AdamW(ms, lr=1e-3, weight_decay=0.1, foreach=True), world, rank)
    ema = sharded_ema(model, world, rank)
    shadow = copy.deepcopy(ema)
    gen, shadow_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    inner = attach_ema(zero, ema, model, decay=0.99, rounding=rounding, generator=gen)
    assert inner is zero.optim and attached_optimizer(ema) is zero.optim and attached_optimizer(shadow) is None
    for step in range(100):
        set_grads(model.parameters(), step)
        set_grads(twin.parameters(), step)
        zero.step()
        ref_zero.step()
        # the very masters the fused step produced, through our separate update_ema
        update_ema(shadow, model, zero, decay=0.99, rounding=rounding, generator=shadow_gen)
        for (name, e), s in zip(ema.named_parameters(), shadow.parameters()):
            assert_bitwise_equal(e, s, f"step {step} ema {name}")
        for a, b in zip(zero.masters, ref_zero.masters):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert fused_ema_step_taken(ema, 0.99, rounding)  # pending steps were counted


def test_ema_of_a_param_without_grad_still_steps_like_update_ema():
    model = Net()
    ema = copy.deepcopy(model)
    shadow = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    opt.attach_ema(ema, model, decay=0.9)
    set_grads(model.parameters(), 0)
    model.scale.grad = None  # not stepped by AdamW, but update_ema moves its EMA towards it
    with torch.no_grad():
        ema.scale.mul_(2)
        shadow.scale.mul_(2)
    opt.step()
    update_ema(shadow, model, None, decay=0.9, sharded=False)
    for e, s in zip(ema.parameters(), shadow.parameters()):
        assert_bitwise_equal(e, s)
    assert not torch.equal(ema.scale, model.scale)


def test_pairing_survives_parameter_changes():
    # As update_ema's cache must: a replaced working param (with a new master),
    # a replaced EMA parameter, p.data swapped -- each seen at the next step.
    model = Net(torch.bfloat16)
    zero = MiniZero(model, lambda ms: FusedAdamW(ms, lr=1e-3))
    ema = sharded_ema(model)
    shadow = copy.deepcopy(ema)
    attach_ema(zero, ema, model, decay=0.9)

    def step(k):
        set_grads(model.parameters(), k)
        zero.step()
        update_ema(shadow, model, zero, decay=0.9)
        for (name, e), s in zip(ema.named_parameters(), shadow.parameters()):
            assert_bitwise_equal(e, s, f"step {k} {name}")

    step(0)
    new = nn.Parameter(model.a.weight.detach() + 1)
    old = model.a.weight
    model.a.weight = new
    zero.replace(old, new)
    step(1)
    replacement = nn.Parameter(ema.b.bias.detach() * 3, requires_grad=False)
    ema.b.bias = replacement
    shadow.b.bias = nn.Parameter(shadow.b.bias.detach() * 3, requires_grad=False)
    step(2)
    assert not torch.equal(replacement, shadow.b.bias * 0)  # the new EMA parameter is the one stepped
    ema.scale.data = ema.scale.data.clone() + 1
    shadow.scale.data = shadow.scale.data.clone() + 1
    step(3)


def test_pairing_sees_a_rename_in_place_and_a_rebound_slot_dict():
    # the same parameter objects in the same order: only the slots' keys or
    # dicts tell these apart from the derived pairing
    model, ema = Net(), Net(seed=1).requires_grad_(False)
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    opt.attach_ema(ema, model, decay=0.9)
    set_grads(model.parameters(), 0)
    opt.step()
    model.b._parameters["b2"] = model.b._parameters.pop("bias")
    set_grads(model.parameters(), 1)
    with pytest.raises(KeyError, match="'b.b2'"):
        opt.step()
    model.b._parameters["bias"] = model.b._parameters.pop("b2")
    opt.step()
    ema.b._parameters = {k: nn.Parameter(v.detach() * 0, requires_grad=False) for k, v in ema.b._parameters.items()}
    set_grads(model.parameters(), 2)
    opt.step()
    for name, e in ema.b.named_parameters():
        assert bool((e != 0).any()), name  # the new dict's parameters were stepped


def test_an_attached_ema_that_is_gone_is_dropped():
    import gc

    model = Net()
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    opt.attach_ema(Net(seed=1).requires_grad_(False), model, decay=0.9)  # nothing else holds it
    gc.collect()
    set_grads(model.parameters(), 0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the AdamW step alone
    assert not opt._attachments()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_update_ema_protocol_not_stepping_twice():
    model = Net()
    ema = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters())
    assert not fused_ema_step_taken(ema)  # nothing attached: update_ema steps it
    opt.attach_ema(ema, model, decay=0.99)
    assert not fused_ema_step_taken(ema, 0.99)  # attached, but no step yet (e.g. the decay=0 copy at start)
    set_grads(model.parameters(), 0)
    opt.step()
    with pytest.raises(ValueError, match="decay=0.99"):
        fused_ema_step_taken(ema, 0.5)
    assert fused_ema_step_taken(ema, 0.99)  # update_ema must do nothing
    assert not fused_ema_step_taken(ema, 0.99)  # and the next call (no step since) steps it
    opt.step()
    assert not fused_ema_step_taken(ema, 0.0)  # decay 0: a copy, which update_ema makes
    opt.detach_ema(ema)
    opt.step()
    assert attached_optimizer(ema) is None and not fused_ema_step_taken(ema, 0.99)


def test_update_ema_does_not_step_an_attached_ema_twice():
    model = Net()
    ema = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters())
    opt.attach_ema(ema, model, decay=0.99)
    set_grads(model.parameters(), 0)
    opt.step()
    after = [e.clone() for e in ema.parameters()]
    update_ema(ema, model, None, decay=0.99, sharded=False)
    for a, b in zip(ema.parameters(), after):
        assert_bitwise_equal(a, b)


# ---------------------------------------------------------------- bad input


def _snap(model, ema, opt):
    out = [t.clone() for t in list(model.parameters()) + list(ema.parameters())]
    for s in opt.state.values():
        out += [t.clone() for t in s.values()]
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)


@pytest.mark.parametrize(
    "bad",
    [
        (
            "shape",
            lambda m, e: setattr(e.a, "bias", nn.Parameter(torch.zeros(36), requires_grad=False)),
            ValueError,
            "EMA parameter 'a.bias' has shape [36] but its source has shape [37]",
        ),
        (
            "dtype",
            lambda m, e: setattr(e.a, "bias", nn.Parameter(torch.zeros(37, dtype=torch.int32), requires_grad=False)),
            TypeError,
            "EMA parameter 'a.bias' has dtype torch.int32",
        ),
        ("missing", lambda m, e: delattr(e.b, "bias"), KeyError, "ema_model has no parameter 'b.bias'"),
        (
            "not owned",
            lambda m, e: setattr(m, "extra", nn.Parameter(torch.zeros(3))),
            ValueError,
            "the EMA source of parameter 'extra' is not a parameter of this optimizer",
        ),
    ],
    ids=lambda b: b[0],
)
def test_bad_ema_raises_at_attach_and_at_step_before_any_write(bad):
    _, breaks, exc, text = bad
    model = Net()
    ema = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters())
    broken_model, broken_ema = copy.deepcopy(model), copy.deepcopy(ema)
    breaks(broken_model, broken_ema)
    if not hasattr(broken_ema, "extra") and hasattr(broken_model, "extra"):
        broken_ema.extra = nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(exc) as info:
        owned = [p for n, p in broken_model.named_parameters() if n != "extra"]
        FusedAdamW(owned).attach_ema(broken_ema, broken_model)
    assert text in str(info.value)
    # the same change after attaching: refused at the step, nothing written
    opt.attach_ema(ema, model)
    set_grads(model.parameters(), 0)
    opt.step()
    breaks(model, ema)
    if hasattr(model, "extra"):
        ema.extra = nn.Parameter(torch.zeros(3), requires_grad=False)
    set_grads(model.parameters(), 1)
    before = _snap(model, ema, opt)
    with pytest.raises(exc) as info:
        opt.step()
    assert text in str(info.value)
    _same(before, _snap(model, ema, opt))


@pytest.mark.parametrize(
    "key,value,text",
    [
        ("lr", math.nan, "lr[0] must be finite and >= 0, got nan"),
        ("lr", math.inf, "lr[0] must be finite and >= 0, got inf"),
        ("eps", math.nan, "eps[0] must be finite"),
        ("weight_decay", -1.0, "weight_decay[0] must be finite and >= 0, got -1.0"),
        ("betas", (0.9, math.nan), "beta2[0] must be in [0, 1), got nan"),
    ],
)
def test_non_finite_hyper_parameters_refused_before_any_write(key, value, text):
    model = Net()
    ema = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters())
    opt.attach_ema(ema, model)
    set_grads(model.parameters(), 0)
    opt.step()
    opt.param_groups[0][key] = value  # e.g. a scheduler gone wrong
    before = _snap(model, ema, opt)
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        opt.step()
    _same(before, _snap(model, ema, opt))
    with pytest.raises(ValueError, match="lr must be finite"):
        FusedAdamW(model.parameters(), lr=math.nan)


def test_constructor_and_dtype_checks():
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        FusedAdamW([nn.Parameter(torch.zeros(2))], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="dtype torch.bfloat16; FusedAdamW steps float32"):
        FusedAdamW([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="lr must be finite and >= 0, got inf"):
        FusedAdamW([{"params": [nn.Parameter(torch.zeros(2))], "lr": math.inf}])
    with pytest.raises(ValueError, match="capturable"):
        FusedAdamW([nn.Parameter(torch.zeros(2))], capturable=True)
    first = nn.Parameter(torch.zeros(2))
    opt = FusedAdamW([first])
    p = nn.Parameter(torch.zeros(2))
    p.grad_dtype = None  # torch refuses a gradient of another dtype otherwise
    p.grad = torch.zeros(2, dtype=torch.bfloat16)
    opt.add_param_group({"params": [p]})
    first.grad = torch.zeros(2)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.bfloat16"):
        opt.step()
    assert not opt.state[p] and not opt.state[first]  # no state kept from the failed step


def test_create_optimizer_fused_adamw():
    from opensora_fast.utils.optimizer import create_optimizer

    model = Net()
    model.scale.requires_grad_(False)
    cfg = {"cls": "FusedAdamW", "lr": 1e-4, "weight_decay": 0.0, "eps": 1e-15}
    opt = create_optimizer(model, cfg)
    assert isinstance(opt, FusedAdamW) and "cls" not in cfg
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["eps"] == 1e-15
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="bias_correction=False"):
        create_optimizer(model, {"cls": "FusedAdamW", "bias_correction": False})
