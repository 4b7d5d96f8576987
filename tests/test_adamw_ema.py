"""AdamW+EMA op: native kernels vs torch's foreach AdamW, the reference, the
EMA op, and the CUDA body's grid walk."""

import math
import os

import pytest
import torch
from contract import WAYS, Contract, assert_three_way, faked, raw, with_backend
from helpers import FLOATS, assert_bitwise_equal, each_isa, needs_native, rand, with_specials

from opensora_fast import ops
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.reference import adamw_ema as ref

pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
SIZES = [0, 1, 7, 4099, 2**16 + 3]


class Case:
    """One call's tensors: `groups` is a list of (sizes, hyper dict); every
    param gets a state with some history, so m, v and vmax are not zero."""

    def __init__(self, groups, ema_dtypes=(), ema_only=(), seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.p, self.g, self.m, self.v, self.vm, self.steps = [], [], [], [], [], []
        self.sizes, self.hyper = (
            [],
            {k: [] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize")},
        )
        for sizes, h in groups:
            self.sizes.append(len(sizes))
            for k in self.hyper:
                self.hyper[k].append(h[k])
            for n in sizes:
                self.p.append(rand(n, torch.float32, g, device))
                self.g.append(rand(n, torch.float32, g, device))
                self.m.append(rand(n, torch.float32, g, device, scale=0.1))
                self.v.append(rand(n, torch.float32, g, device).square() * 0.01)
                if h["amsgrad"]:
                    self.vm.append(self.v[-1] * 1.01)
                self.steps.append(torch.tensor(float(h.get("step", 3)), dtype=torch.float32))
        # EMA twins of the first params, then EMA-only pairs of other fp32 tensors
        self.ema = [rand(p.numel(), dt, g, device).view(p.shape) for p, dt in zip(self.p, ema_dtypes)]
        self.src = list(self.p[: len(self.ema)])
        for n, dt in ema_only:
            self.src.append(rand(n, torch.float32, g, device))
            self.ema.append(rand(n, dt, g, device))

    def tensors(self):
        return [self.p, self.g, self.m, self.v, self.vm, self.steps, self.ema, self.src]

    def clone(self):
        c = Case.__new__(Case)
        c.sizes, c.hyper = list(self.sizes), {k: list(v) for k, v in self.hyper.items()}
        c.p, c.g, c.m, c.v, c.vm, c.steps = (
            [t.clone() for t in lst] for lst in (self.p, self.g, self.m, self.v, self.vm, self.steps)
        )
        c.ema = [t.clone() for t in self.ema]
        # a source that is a param stays that param
        idx = {id(p): i for i, p in enumerate(self.p)}
        c.src = [c.p[idx[id(s)]] if id(s) in idx else s.clone() for s in self.src]
        return c

    def args(self, decay=0.999):
        h = self.hyper
        return (
            self.p,
            self.g,
            self.m,
            self.v,
            self.vm,
            self.steps,
            self.sizes,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["eps"],
            h["weight_decay"],
            [int(x) for x in h["amsgrad"]],
            [int(x) for x in h["maximize"]],
            self.ema,
            self.src,
            decay,
        )

    def assert_equal(self, other, msg=""):
        for name, a, b in zip(("p", "g", "m", "v", "vm", "steps", "ema", "src"), self.tensors(), other.tensors()):
            for i, (x, y) in enumerate(zip(a, b)):
                assert_bitwise_equal(x, y, f"{msg} {name}[{i}]")


def H(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, step=3):
    return dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        step=step,
    )


HYPERS = {
    "plain": H(),
    "wd": H(weight_decay=0.1, lr=3e-3),
    "amsgrad": H(amsgrad=True, weight_decay=0.05),
    "maximize": H(maximize=True),
    "beta1<=0.5": H(beta1=0.3, beta2=0.5, eps=1e-3),  # torch's other lerp branch
    "step1": H(step=0),
}


def torch_adamw(case: Case):
    """torch.optim.AdamW(foreach=True) on copies of case's tensors, one step; returns the case it produced."""
    out = case.clone()
    k = 0
    lo = 0
    for gi, n in enumerate(case.sizes):
        h = {key: v[gi] for key, v in case.hyper.items()}
        ps = [torch.nn.Parameter(t) for t in out.p[lo : lo + n]]
        opt = torch.optim.AdamW(
            ps,
            lr=h["lr"],
            betas=(h["beta1"], h["beta2"]),
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            amsgrad=h["amsgrad"],
            maximize=h["maximize"],
            foreach=True,
        )
        for j, p in enumerate(ps):
            p.grad = out.g[lo + j]
            st = dict(step=out.steps[lo + j], exp_avg=out.m[lo + j], exp_avg_sq=out.v[lo + j])
            if h["amsgrad"]:
                st["max_exp_avg_sq"] = out.vm[k]
                k += 1
            opt.state[p] = st
        if ps:
            opt.step()
        lo += n
    return out


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The fp32 ulp at |x| (the smallest subnormal at 0)."""
    x = x.float().abs()
    return torch.where(x == 0, torch.full_like(x, 2**-149), torch.nextafter(x, torch.full_like(x, math.inf)) - x)


def assert_master_close(ours, theirs, decayed, msg=""):
    """ours vs torch's CPU AdamW master: torch's CPU sqrt (MKL) is 1 ulp off on
    ~15% of inputs, ours is correctly rounded. A denominator 1 ulp (2^-23
    relative) apart moves the update by at most 2^-23 of itself plus its
    rounding: 3 ulp of the update; the sum then rounds by up to 1 ulp of p."""
    delta = (theirs.double() - decayed.double()).float()
    bound = spacing(theirs) + 3 * spacing(delta)
    bad = (ours.double() - theirs.double()).abs() > bound.double()
    assert not bool(bad.any()), f"{msg}: {int(bad.sum())} of {ours.numel()} elements beyond ulp(p) + 3 ulp(update)"


@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
def test_native_cpu_vs_torch_foreach_adamw_and_reference(hyper):
    # One group per hyper setting plus a second group with another lr. m, v,
    # vmax and the steps are torch's foreach AdamW bit for bit (same operations,
    # same order); the masters are the reference's bit for bit, and torch's
    # within ulp(p) + 3 ulp(update) (torch's CPU sqrt is not correctly rounded).
    groups = [(SIZES, HYPERS[hyper]), ([5, 33], dict(HYPERS[hyper], lr=0.02))]
    case = Case(groups, seed=1)
    want, other = torch_adamw(case), case.clone()
    decayed = [
        p * torch.tensor(1 - h["lr"] * h["weight_decay"], dtype=torch.float32)
        for p, h in zip(case.p, [groups[0][1]] * len(SIZES) + [groups[1][1]] * 2)
    ]
    torch.ops.opensora_fast.adamw_ema_(*case.args())
    ref.adamw_ema_(*other.args())
    case.assert_equal(other, hyper)
    for name, a, b in (
        ("m", case.m, want.m),
        ("v", case.v, want.v),
        ("vm", case.vm, want.vm),
        ("steps", case.steps, want.steps),
    ):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{hyper} {name}[{i}]")
    for i, (x, y, d) in enumerate(zip(case.p, want.p, decayed)):
        assert_master_close(x, y, d, f"{hyper} p[{i}]")


@pytest.mark.parametrize("stochastic", [False, True], ids=["compat", "stochastic"])
def test_ema_equals_ema_update_on_the_fused_masters(stochastic):
    # The EMA, fused, equals the EMA op run afterwards on the masters the step produced.
    dts = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]
    case = Case([(SIZES, HYPERS["wd"])], ema_dtypes=dts, ema_only=[(100, torch.bfloat16), (9, torch.float32)], seed=2)
    ema0 = [e.clone() for e in case.ema]
    ops.adamw_ema_(*case.args(0.9999), stochastic=stochastic, seed=77)
    want = [e.clone() for e in ema0]
    ops.ema_update_(want, case.src, 0.9999, stochastic=stochastic, seed=77)
    for i, (a, b) in enumerate(zip(case.ema, want)):
        assert_bitwise_equal(a, b, f"ema[{i}]")
    # and the masters equal a step without EMA
    plain = Case([(SIZES, HYPERS["wd"])], seed=2)
    ops.adamw_ema_(*plain.args())
    for i, (a, b) in enumerate(zip(case.p, plain.p)):
        assert_bitwise_equal(a, b, f"p[{i}]")


@pytest.mark.parametrize("stochastic", [False, True], ids=["compat", "stochastic"])
def test_native_equals_reference(stochastic):
    groups = [(SIZES, HYPERS["amsgrad"]), ([3, 1000], HYPERS["maximize"]), ([], HYPERS["plain"])]
    case = Case(groups, ema_dtypes=[torch.bfloat16] * 4 + [torch.float16], ema_only=[(77, torch.float32)], seed=3)
    other = case.clone()
    ops.adamw_ema_(*case.args(0.99), stochastic=stochastic, seed=5)
    ref.adamw_ema_(*other.args(0.99), stochastic=stochastic, seed=5)
    case.assert_equal(other)


def misalign(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:].copy_(t)
    return buf[1:]


@pytest.mark.parametrize("limits", [(0, 0, False), (3, 5, False), (0, 0, True)], ids=["big", "tiny", "small-table"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["compat", "stochastic"])
def test_grid_walk_matches_native(limits, stochastic):
    # The CUDA kernel's per-thread body over its whole launch grid, on the CPU:
    # tails, chunks of 32768, tables split by entry count and block count,
    # misaligned tensors (vector path off), EMA-only entries, amsgrad/maximize mixed.
    sizes = [1, 3, 4099, 32768, 32769, 3 * 32768 + 5] + [64] * 40
    groups = [(sizes, HYPERS["amsgrad"]), ([7, 70000], HYPERS["maximize"])]
    dts = [torch.bfloat16, torch.float16, torch.float32] * 16
    case = Case(groups, ema_dtypes=dts, ema_only=[(5000, torch.bfloat16), (3, torch.float32)], seed=4)
    walked = case.clone()
    for c in (case, walked):  # storage offset 1: not 16-byte aligned
        for lst in (c.p, c.g, c.m, c.v, c.ema):
            lst[2] = misalign(lst[2])
        c.src[2] = c.p[2]
    ops.adamw_ema_(*case.args(0.999), stochastic=stochastic, seed=9)
    torch.ops.opensora_fast._adamw_ema_grid_walk_(*walked.args(0.999), stochastic, 9, *limits)
    case.assert_equal(walked)


def test_steps_counted_versions_bumped_and_empty_calls():
    case = Case([([5, 0], HYPERS["plain"])], ema_dtypes=[torch.bfloat16])
    before = [t._version for t in case.p + case.m + case.v + case.steps + case.ema]
    ops.adamw_ema_(*case.args())
    assert [float(s) for s in case.steps] == [4.0, 4.0]  # every step counted, empty params too (as torch)
    after = [t._version for t in case.p + case.m + case.v + case.steps + case.ema]
    assert all(a > b for a, b in zip(after, before))
    ops.adamw_ema_([], [], [], [], [], [], [], [], [], [], [], [], [], [])
    torch.ops.opensora_fast.adamw_ema_([], [], [], [], [], [], [], [], [], [], [], [], [], [], [], [], 0.9)


def test_requires_grad_under_grad_mode_refused():
    case = Case([([5], HYPERS["plain"])])
    case.p[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad and grad mode is on"):
        ops.adamw_ema_(*case.args())
    with torch.no_grad():
        ops.adamw_ema_(*case.args())


def test_opcheck():
    case = Case([([5, 1000], HYPERS["amsgrad"])], ema_dtypes=[torch.bfloat16, torch.bfloat16])
    torch.library.opcheck(torch.ops.opensora_fast.adamw_ema_.default, case.args(0.99) + (False, 0))
    torch.library.opcheck(torch.ops.opensora_fast.adamw_ema_.default, case.args(0.99) + (True, 3))


def _bad_cases():
    """(id, mutate(case) -> args override, exception, text)."""
    f = lambda n, dt=torch.float32: torch.zeros(n, dtype=dt)  # noqa: E731

    def with_(**kw):
        def mutate(c):
            a = list(c.args())
            names = [
                "params",
                "grads",
                "exp_avgs",
                "exp_avg_sqs",
                "max_exp_avg_sqs",
                "steps",
                "group_sizes",
                "lr",
                "beta1",
                "beta2",
                "eps",
                "weight_decay",
                "amsgrad",
                "maximize",
                "ema",
                "ema_src",
                "decay",
            ]
            for k, v in kw.items():
                a[names.index(k)] = v(c) if callable(v) else v
            return a

        return mutate

    def setp(lst, i, t):
        def f_(c):
            x = list(getattr(c, lst))
            x[i] = t(c) if callable(t) else t
            return x

        return f_

    return [
        ("len grads", with_(grads=lambda c: c.g[:1]), ValueError, "len(params)=2, len(grads)=1"),
        ("group lists", with_(lr=[1e-3, 1e-3]), ValueError, "one value per group"),
        (
            "group sizes",
            with_(group_sizes=[3]),
            ValueError,
            "group_sizes must be >= 0 and sum to len(params)=2, got [3]",
        ),
        ("max len", with_(max_exp_avg_sqs=lambda c: [f(3)]), ValueError, "max_exp_avg_sqs must have one tensor"),
        ("ema len", with_(ema_src=[]), ValueError, "len(ema)=2 and len(ema_src)=0"),
        ("lr nan", with_(lr=[math.nan]), ValueError, "lr[0] must be finite and >= 0, got nan"),
        ("lr inf", with_(lr=[math.inf]), ValueError, "lr[0] must be finite and >= 0, got inf"),
        ("eps neg", with_(eps=[-1e-8]), ValueError, "eps[0] must be finite and >= 0, got -1e-08"),
        ("wd nan", with_(weight_decay=[math.nan]), ValueError, "weight_decay[0] must be finite"),
        ("beta1 1", with_(beta1=[1.0]), ValueError, "beta1[0] must be in [0, 1), got 1.0"),
        ("beta2 nan", with_(beta2=[math.nan]), ValueError, "beta2[0] must be in [0, 1), got nan"),
        ("decay", with_(decay=1.5), ValueError, "decay must be in [0, 1], got 1.5"),
        (
            "bf16 param",
            with_(params=setp("p", 1, lambda c: c.p[1].bfloat16())),
            TypeError,
            "params[1] has dtype torch.bfloat16; expected torch.float32",
        ),
        ("bf16 grad", with_(grads=setp("g", 1, lambda c: c.g[1].bfloat16())), TypeError, "grads[1] has dtype"),
        (
            "grad shape",
            with_(grads=setp("g", 1, lambda c: f(4))),
            ValueError,
            "grads[1] has shape [4] but params[1] has shape [5]",
        ),
        (
            "m strided",
            with_(exp_avgs=setp("m", 1, lambda c: torch.zeros(5, 2)[:, 0])),
            ValueError,
            "exp_avgs[1] is not contiguous",
        ),
        (
            "step dtype",
            with_(steps=setp("steps", 1, lambda c: torch.tensor(3.0, dtype=torch.float64))),
            ValueError,
            "steps[1] must be a float32 tensor of one element on the CPU",
        ),
        (
            "ema int",
            with_(ema=setp("ema", 1, lambda c: f(5, torch.int32))),
            TypeError,
            "ema[1] has dtype torch.int32; expected float32, bfloat16 or float16",
        ),
        (
            "ema shape",
            with_(ema=setp("ema", 1, lambda c: f(6, torch.bfloat16))),
            ValueError,
            "ema[1] has shape [6] but ema_src[1] has shape [5]",
        ),
        (
            "ema src dtype",
            with_(ema_src=setp("src", 1, lambda c: f(5, torch.bfloat16))),
            TypeError,
            "ema_src[1] has dtype torch.bfloat16",
        ),
        (
            "meta",
            with_(grads=setp("g", 1, lambda c: torch.zeros(5, device="meta"))),
            ValueError,
            "params[0] is on cpu but grads[1] is on meta",
        ),
        (
            "alias m=p",
            with_(exp_avgs=setp("m", 1, lambda c: c.p[1])),
            ValueError,
            "params[1] and exp_avgs[1] overlap in memory",
        ),
        ("ema=src", with_(ema=setp("ema", 1, lambda c: c.p[1])), ValueError, "overlap in memory"),
        (
            "twice twin",
            with_(ema_src=lambda c: [c.p[0], c.p[0]], ema=lambda c: [c.ema[0], f(3, torch.bfloat16)]),
            ValueError,
            "ema_src[0] and ema_src[1] are both params[0]",
        ),
        (
            "partial src",
            with_(ema_src=setp("src", 1, lambda c: c.p[1][:4]), ema=setp("ema", 1, lambda c: f(4, torch.bfloat16))),
            ValueError,
            "overlap in memory",
        ),
    ]


def _fresh_bad_case():
    case = Case([([3, 5], HYPERS["plain"])], ema_dtypes=[torch.bfloat16, torch.bfloat16])
    return case


ADAMW_OP = Contract(
    {
        "native": with_backend("native", ops.adamw_ema_),
        "reference": with_backend("reference", ops.adamw_ema_),
        "fake": faked(raw("adamw_ema_")),
        "raw op": raw("adamw_ema_"),
        "raw reference": ref.adamw_ema_,
    }
)


@pytest.mark.parametrize("backend", WAYS)
@pytest.mark.parametrize("bad", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_same_error_everywhere_nothing_written(bad, backend):
    _, mutate, exc, text = bad
    made = []

    def fresh():
        case = _fresh_bad_case()
        made.append((case, case.clone()))
        return tuple(mutate(case))

    assert_three_way(ADAMW_OP, backend, fresh, exc, text)  # native and reference: through the wrapper
    for case, snap in made:
        case.assert_equal(snap, "written before the error")


def test_raw_op_and_reference_messages_are_identical():
    for _, mutate, exc, text in _bad_cases():
        fresh = lambda: tuple(mutate(_fresh_bad_case()))  # noqa: E731
        assert_three_way(ADAMW_OP, "raw op", fresh, exc, text, compare=("raw op", "raw reference"))


def test_backend_reference_forced_matches_native(monkeypatch):
    case = Case([(SIZES, HYPERS["wd"])], ema_dtypes=[torch.bfloat16] * 5, seed=6)
    other = case.clone()
    ops.adamw_ema_(*case.args())
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    ops.adamw_ema_(*other.args())
    case.assert_equal(other)


# ------------------------------------------------------------------ CUDA


def _to(case, device):
    c = case.clone()
    for lst in (c.p, c.g, c.m, c.v, c.vm, c.ema):
        lst[:] = [t.to(device) for t in lst]
    idx = {id(p): i for i, p in enumerate(case.p)}
    c.src = [c.p[idx[id(s)]] if id(s) in idx else s.to(device) for s in case.src]
    return c


@pytest.mark.cuda
@pytest.mark.parametrize("small", [False, True], ids=["big-tables", "small-tables"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["compat", "stochastic"])
def test_cuda_equals_cpu_bitwise(stochastic, small):
    groups = [([1, 3, 4099, 32769, 2**20 + 3] + [64] * 300, HYPERS["amsgrad"]), ([7, 70000], HYPERS["maximize"])]
    case = Case(
        groups,
        ema_dtypes=[torch.bfloat16, torch.float16, torch.float32] * 103,
        ema_only=[(5000, torch.bfloat16)],
        seed=8,
    )
    gpu = _to(case, "cuda")
    prev = torch.ops.opensora_fast._force_small_tables(small)
    try:
        ops.adamw_ema_(*gpu.args(0.9999), stochastic=stochastic, seed=3)
    finally:
        torch.ops.opensora_fast._force_small_tables(prev)
    ops.adamw_ema_(*case.args(0.9999), stochastic=stochastic, seed=3)
    case.assert_equal(_to(gpu, "cpu"))


@pytest.mark.cuda
def test_cuda_vs_torch_cuda_foreach():
    # torch's CUDA sqrt is correctly rounded; its other ops may be contracted
    # to fma by nvcc, so: m, v within 1 ulp, masters within ulp(p) + 3 ulp(update).
    case = _to(Case([(SIZES, HYPERS["amsgrad"]), ([33], HYPERS["wd"])], seed=9), "cuda")
    hs = [HYPERS["amsgrad"]] * len(SIZES) + [HYPERS["wd"]]
    decayed = [p * torch.tensor(1 - h["lr"] * h["weight_decay"], dtype=torch.float32) for p, h in zip(case.p, hs)]
    want = torch_adamw(case)
    ops.adamw_ema_(*case.args())
    for a, b in zip(case.m + case.v + case.vm, want.m + want.v + want.vm):
        assert bool(((a - b).abs() <= spacing(b)).all())
    for a, b, d in zip(case.p, want.p, decayed):
        assert_master_close(a.cpu(), b.cpu(), d.cpu())


@pytest.mark.cuda
def test_cuda_graph_capture_refused_no_host_sync():
    case = _to(Case([([5, 4099], HYPERS["plain"])], ema_dtypes=[torch.bfloat16]), "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.adamw_ema_(*case.args())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(g):
            ops.adamw_ema_(*case.args())


def test_non_finite_gradients_propagate_like_the_reference():
    # NaN/inf in the vector body and the tails: amsgrad's maximum keeps NaN
    # (torch.maximum), and every output matches the reference NaN for NaN.
    case = Case([([4099, 13], HYPERS["amsgrad"])], ema_dtypes=[torch.bfloat16, torch.bfloat16], seed=11)
    for t in case.g:
        t[::97] = math.nan
        t[5::101] = math.inf
        t[-1] = -math.inf
    case.vm[0][3::89] = math.nan
    other = case.clone()
    walked = case.clone()
    ops.adamw_ema_(*case.args())
    ref.adamw_ema_(*other.args())
    torch.ops.opensora_fast._adamw_ema_grid_walk_(*walked.args(), False, 0, 0, 0, False)
    for x in (other, walked):
        for a, b in zip(case.p + case.m + case.v + case.vm + case.ema, x.p + x.m + x.v + x.vm + x.ema):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---- CPU ISA variants (baseline, AVX2, AVX-512): the same bits in every one ----------------


@needs_native
@pytest.mark.parametrize("edt", FLOATS, ids=str)
@pytest.mark.parametrize("amsgrad", [0, 1])
def test_adamw_ema_same_bits_in_every_variant(edt, amsgrad):
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 17, 600, 4099]
    p = [torch.randn(n, generator=gen) for n in sizes]
    g = [with_specials(n, torch.float32, gen) for n in sizes]
    m = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    v = [torch.randn(n, generator=gen).square() * 0.01 for n in sizes]
    vm = [x * 1.01 for x in v] if amsgrad else []
    ema = [torch.randn(n, generator=gen).to(edt) for n in sizes]

    def run():
        ts = [[x.clone() for x in lst] for lst in (p, m, v, vm, ema)]
        pp, mm, vv, vvm, ee = ts
        steps = [torch.tensor(3.0) for _ in sizes]
        torch.ops.opensora_fast.adamw_ema_(
            pp, g, mm, vv, vvm, steps, [len(sizes)], [1e-3], [0.9], [0.999], [1e-8], [0.1], [amsgrad], [0], ee, pp, 0.99
        )
        return [x for lst in ts for x in lst]

    out = each_isa(run)
    for isa, got in out.items():
        for i, (a, b) in enumerate(zip(got, out["baseline"])):
            assert_bitwise_equal(a, b, f"{isa} [{i}]")
