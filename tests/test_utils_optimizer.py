"""opensora_fast.utils.optimizer and the rest of opensora_fast.utils.train.

LR schedules are compared step by step with reference ports written here:
upstream's LinearWarmupLR (opensora/utils/optimizer.py) and ColossalAI's
CosineAnnealingWarmupLR (colossalai/nn/lr_scheduler/cosine.py + delayed.py:
WarmupScheduler over torch's CosineAnnealingLR), and with closed forms derived by hand.
"""

import math
import sys
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from opensora_fast.utils import optimizer as O
from opensora_fast.utils import train as T

# ---------------------------------------------------------------- reference ports


class RefLinearWarmupLR(LRScheduler):
    # upstream opensora/utils/optimizer.py
    def __init__(self, optimizer, initial_lr=0, warmup_steps=0, last_epoch=-1):
        self.initial_lr = initial_lr
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_lr(self):
        if self.last_epoch < self.warmup_steps:
            return [
                self.initial_lr + (self.last_epoch + 1) / (self.warmup_steps + 1) * (lr - self.initial_lr)
                for lr in self.base_lrs
            ]
        return self.base_lrs


class RefWarmupScheduler(LRScheduler):
    # ColossalAI TwoStageScheduler + WarmupScheduler (delayed.py), as written there
    def __init__(self, optimizer, warmup_epochs, after_scheduler, last_epoch=-1):
        self.warmup_epochs = int(warmup_epochs)
        self.after_scheduler = after_scheduler
        self.finished = False
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epochs:
            if not self.finished:
                self.after_scheduler.base_lrs = self.base_lrs
                self.finished = True
            return self.after_scheduler.get_lr()
        return [(self.last_epoch + 1) / self.warmup_epochs * lr for lr in self.base_lrs]

    def step(self, epoch=None):
        if self.finished:
            if epoch is None:
                self.after_scheduler.step(None)
                self._last_lr = self.after_scheduler.get_last_lr()
            else:
                self.after_scheduler.step(epoch - self.warmup_epochs)
                self._last_lr = self.after_scheduler.get_last_lr()
        else:
            return super().step(epoch)


class RefCosineAnnealingWarmupLR(RefWarmupScheduler):
    # colossalai/nn/lr_scheduler/cosine.py
    def __init__(self, optimizer, total_steps, warmup_steps=0, eta_min=0.0, last_epoch=-1):
        base = CosineAnnealingLR(optimizer, total_steps - warmup_steps, eta_min=eta_min, last_epoch=last_epoch)
        super().__init__(optimizer, warmup_steps, base, last_epoch=last_epoch)


def make_opt(lr=1e-3, groups=1):
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(ps)], lr=lr)


def run(sched_factory, steps, lr=1e-3, groups=2):
    opt = make_opt(lr, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = sched_factory(opt)
        seq = [[g["lr"] for g in opt.param_groups]]
        last = [s.get_last_lr()]
        for _ in range(steps):
            opt.step()
            s.step()
            seq.append([g["lr"] for g in opt.param_groups])
            last.append(s.get_last_lr())
    return seq, last, s


# ---------------------------------------------------------------- LinearWarmupLR


@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("initial_lr", [0, 1e-6])
def test_linear_warmup_matches_upstream(warmup, initial_lr):
    ours, ours_last, _ = run(lambda o: O.LinearWarmupLR(o, initial_lr=initial_lr, warmup_steps=warmup), 9)
    ref, ref_last, _ = run(lambda o: RefLinearWarmupLR(o, initial_lr=initial_lr, warmup_steps=warmup), 9)
    assert ours == ref and ours_last == ref_last


def test_linear_warmup_closed_form():
    seq, _, _ = run(lambda o: O.LinearWarmupLR(o, initial_lr=0.0, warmup_steps=3), 5, lr=1.0, groups=1)
    # lr_e = (e + 1) / (w + 1) * base while e < w, then base
    assert [s[0] for s in seq] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------- CosineAnnealingWarmupLR


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
@pytest.mark.parametrize("total", [10, 13])
@pytest.mark.parametrize("eta_min", [0.0, 1e-5])
def test_cosine_warmup_matches_colossalai(warmup, total, eta_min):
    steps = total + 4  # past the end of the schedule too
    ours, ours_last, s = run(lambda o: O.CosineAnnealingWarmupLR(o, total, warmup_steps=warmup, eta_min=eta_min), steps)
    ref, ref_last, r = run(lambda o: RefCosineAnnealingWarmupLR(o, total, warmup_steps=warmup, eta_min=eta_min), steps)
    assert ours == ref  # exact: same float operations
    assert ours_last == ref_last
    assert s.finished == r.finished and s.last_epoch == r.last_epoch


def test_cosine_warmup_shape():
    base, warmup, total = 1.0, 4, 24
    seq, _, _ = run(lambda o: O.CosineAnnealingWarmupLR(o, total, warmup_steps=warmup), total, lr=base, groups=1)
    lrs = [s[0] for s in seq]
    # warmup: (i + 1) / warmup * base (ColossalAI's WarmupScheduler)
    assert lrs[:warmup] == [(i + 1) / warmup * base for i in range(warmup)]
    # then a cosine over T = total - warmup steps, down to eta_min = 0 at the end.
    # ColossalAI hands over by calling torch's CosineAnnealingLR.get_lr() at its
    # last_epoch 0 outside its initial step. Torch releases that return the group's
    # lr there give lr_k = base * (1 + cos(pi k / T)) / 2; torch releases with the
    # `_is_initial` flag (2.14 here) apply the recursive formula, which scales the
    # whole cosine: lr_k = base * (1 + cos(pi k / T)) / (1 + cos(pi / T)) (derived by
    # hand from the recursion; lr_1 == base). Both are ColossalAI's values on that torch.
    T_max = total - warmup
    scaled = lrs[warmup] != base
    denom = (1 + math.cos(math.pi / T_max)) if scaled else 2.0
    for k in range(T_max + 1):
        want = base * (1 + math.cos(math.pi * k / T_max)) / denom
        assert lrs[warmup + k] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(a >= b for a, b in zip(lrs[warmup + 1 :], lrs[warmup + 2 :]))


def test_cosine_warmup_state_dict_layout_and_resume():
    opt = make_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = O.CosineAnnealingWarmupLR(opt, 20, warmup_steps=3)
        for _ in range(6):
            s.step()
        sd = s.state_dict()
        assert sd["after_scheduler_type"] == "CosineAnnealingLR"
        assert "after_scheduler" not in sd and "optimizer" not in sd and "after_scheduler_dict" in sd
        assert sd["finished"] and sd["warmup_epochs"] == 3
        opt2 = make_opt()
        s2 = O.CosineAnnealingWarmupLR(opt2, 20, warmup_steps=3)
        s2.load_state_dict(sd)
        for g1, g2 in zip(opt.param_groups, opt2.param_groups):
            g2["lr"] = g1["lr"]
        for _ in range(5):
            s.step()
            s2.step()
            assert s.get_last_lr() == s2.get_last_lr()


def test_cosine_warmup_bad_args():
    with pytest.raises(ValueError, match="total_steps"):
        O.CosineAnnealingWarmupLR(make_opt(), 5, warmup_steps=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        O.CosineAnnealingWarmupLR(make_opt(), 5, warmup_steps=-1)


# ---------------------------------------------------------------- create_lr_scheduler / create_optimizer


def test_create_lr_scheduler():
    opt = make_opt()
    assert O.create_lr_scheduler(opt, 10) is None
    s = O.create_lr_scheduler(opt, 10, epochs=2, warmup_steps=3, use_cosine_scheduler=True)
    assert isinstance(s, O.CosineAnnealingWarmupLR) and s.after_scheduler.T_max == 17
    s = O.create_lr_scheduler(
        make_opt(), 10, epochs=2, use_cosine_scheduler=True
    )  # warmup None -> 0 (upstream crashes)
    assert s.warmup_epochs == 0 and s.after_scheduler.T_max == 20
    s = O.create_lr_scheduler(make_opt(), 10, warmup_steps=4)
    assert isinstance(s, O.LinearWarmupLR) and s.warmup_steps == 4 and s.initial_lr == 1e-6
    s = O.create_lr_scheduler(make_opt(), 10, warmup_steps=4, initial_lr=0.0)
    assert s.initial_lr == 0.0


def test_create_optimizer_adamw_and_errors(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    cfg = {"cls": "AdamW", "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-15, "adamw_mode": True}
    opt = O.create_optimizer(model, cfg)
    assert "cls" not in cfg  # popped, as upstream
    assert isinstance(opt, torch.optim.AdamW)
    params = opt.param_groups[0]["params"]
    assert len(params) == 3 and all(p.requires_grad for p in params)
    assert opt.param_groups[0]["eps"] == 1e-15 and opt.param_groups[0]["weight_decay"] == 0.1
    assert not opt.param_groups[0]["fused"]  # CPU parameters: not fused
    # HybridAdam's defaults, not torch's: weight_decay 0; adamw_mode=False is Adam with L2 decay
    opt = O.create_optimizer(model, {"cls": "AdamW", "lr": 1e-3})
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.0
    opt = O.create_optimizer(model, {"cls": "AdamW", "adamw_mode": False, "weight_decay": 0.1})
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="bias_correction"):
        O.create_optimizer(model, {"cls": "AdamW", "bias_correction": False})

    with pytest.raises(ValueError) as e:
        O.create_optimizer(model, {"cls": "Adam", "lr": 1.0})
    assert "'Adam'" in str(e.value) and "HybridAdam" in str(e.value) and "AdamW" in str(e.value)
    monkeypatch.setitem(sys.modules, "colossalai", None)
    monkeypatch.setitem(sys.modules, "colossalai.nn", None)
    monkeypatch.setitem(sys.modules, "colossalai.nn.optimizer", None)
    with pytest.raises(ImportError, match=r"opensora_fast\[colossalai\]"):
        O.create_optimizer(model, {"lr": 1.0})


def test_create_optimizer_hybridadam_when_present(monkeypatch):
    import types

    made = {}

    class FakeHybridAdam(torch.optim.SGD):
        def __init__(self, params, lr, **kw):
            made.update(kw)
            super().__init__(params, lr=lr)

    mod = types.ModuleType("colossalai.nn.optimizer")
    mod.HybridAdam = FakeHybridAdam
    for name in ("colossalai", "colossalai.nn"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "colossalai.nn.optimizer", mod)
    opt = O.create_optimizer(torch.nn.Linear(2, 2), {"lr": 0.5, "weight_decay": 0.0})
    assert isinstance(opt, FakeHybridAdam) and made == {"weight_decay": 0.0}


# ---------------------------------------------------------------- train setters


def test_set_lr_eps_warmup():
    opt = make_opt(groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = O.LinearWarmupLR(opt, initial_lr=1e-6, warmup_steps=10)
    T.set_lr(opt, s, 5e-4, initial_lr=1e-7)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    assert s.base_lrs == [5e-4, 5e-4] and s.initial_lr == 1e-7
    T.set_lr(opt, s, 4e-4)
    assert s.initial_lr == 1e-7 and s.base_lrs == [4e-4, 4e-4]
    T.set_warmup_steps(s, 3)
    assert s.warmup_steps == 3
    T.set_eps(opt, None)
    assert all("eps" not in g for g in opt.param_groups)
    T.set_eps(opt, 1e-15)
    assert [g["eps"] for g in opt.param_groups] == [1e-15, 1e-15]
    # other schedulers: only the optimizer's lr changes
    c = O.CosineAnnealingWarmupLR(make_opt(), 10, 2)
    before = list(c.base_lrs)
    T.set_lr(c.optimizer, c, 0.5, initial_lr=0.1)
    T.set_warmup_steps(c, 7)
    assert c.base_lrs == before and c.warmup_epochs == 2 and c.optimizer.param_groups[0]["lr"] == 0.5
    T.set_lr(opt, None, 0.1)  # no scheduler
    assert opt.param_groups[0]["lr"] == 0.1


def test_dropout_condition_matches_upstream():
    txt = torch.randn(64, 5, 3)
    null = torch.randn(1, 5, 3)
    torch.manual_seed(0)
    got = T.dropout_condition(0.3, txt, null)
    torch.manual_seed(0)  # upstream: one torch.rand(B) draw, torch.where over broadcast
    drop = (torch.rand(64) < 0.3).view(64, 1, 1)
    want = torch.where(drop, null, txt)
    assert torch.equal(got, want)
    n_null = sum(torch.equal(got[i], null[0]) for i in range(64))
    assert 0 < n_null < 64
    with pytest.warns(UserWarning, match="Dropout probability is 0"):
        out = T.dropout_condition(0, txt, null)
    assert torch.equal(out, txt)
    assert torch.equal(T.dropout_condition(1.0, txt, null), null.expand_as(txt))


def test_warmup_ae_encodes_each_shape():
    seen = []

    class AE(torch.nn.Module):
        def encode(self, x):
            seen.append((tuple(x.shape), x.dtype, torch.is_grad_enabled()))
            return x

    T.warmup_ae(AE(), [(1, 3, 5, 8, 8), (2, 3, 1, 4, 4)], torch.device("cpu"), torch.float64)
    assert seen == [((1, 3, 5, 8, 8), torch.float64, False), ((2, 3, 1, 4, 4), torch.float64, False)]


def test_create_colossalai_plugin_errors(monkeypatch):
    with pytest.raises(ValueError) as e:
        T.create_colossalai_plugin("zero3", "bf16", 1.0)
    assert "'zero3'" in str(e.value) and "zero2" in str(e.value) and "hybrid" in str(e.value)
    for name in ("colossalai", "colossalai.booster", "colossalai.booster.plugin"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"opensora_fast\[colossalai\]"):
        T.create_colossalai_plugin("zero2", "bf16", 1.0)


def test_create_colossalai_plugin_with_fake_colossalai(monkeypatch):
    import types

    import torch.distributed as dist

    from opensora_fast.utils import misc as M

    class Plugin:
        def __init__(self, **kw):
            self.kw = kw
            self.tp_group, self.sp_group, self.dp_group = "tp", "sp", "dp"

    class Zero(Plugin):
        pass

    class Hybrid(Plugin):
        pass

    mod = types.ModuleType("colossalai.booster.plugin")
    mod.LowLevelZeroPlugin, mod.HybridParallelPlugin = Zero, Hybrid
    for name in ("colossalai", "colossalai.booster"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "colossalai.booster.plugin", mod)
    monkeypatch.setattr(M, "_GROUPS", {})
    z = T.create_colossalai_plugin("zero1", "bf16", 1.0, reduce_bucket_size_in_m=64)
    assert isinstance(z, Zero) and z.kw == dict(
        stage=1,
        precision="bf16",
        initial_scale=2**16,
        max_norm=1.0,
        overlap_allgather=True,
        cast_inputs=False,
        reduce_bucket_size_in_m=64,
    )
    assert M._GROUPS["data"] is dist.group.WORLD
    with pytest.raises(ValueError, match="sequence parallelism"):
        T.create_colossalai_plugin("zero2", "bf16", 1.0, sp_size=2)

    class Policy:
        pass

    h = T.create_colossalai_plugin("hybrid", "fp16", 0.5, tp_size=2, custom_policy=Policy)
    kw = dict(h.kw)
    assert isinstance(kw.pop("custom_policy"), Policy)
    assert kw == dict(
        precision="fp16",
        initial_scale=2**16,
        max_norm=0.5,
        overlap_allgather=True,
        tp_size=2,
        find_unused_parameters=True,
        zero_bucket_size_in_m=20,
        enable_metadata_cache=False,
    )
    assert (M._GROUPS["tensor"], M._GROUPS["sequence"], M._GROUPS["data"]) == ("tp", "sp", "dp")


def test_setup_device_bad_backend():
    with pytest.raises(ValueError, match="'mpi'"):
        T.setup_device(backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="gloo"):
            T.setup_device(backend="nccl")
