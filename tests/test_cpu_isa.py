"""CPU ISA variants (csrc/cpu_isa.h: baseline, AVX2, AVX-512, chosen at run time)
give the same bits for every op and dtype; the private switch that forces one;
and the CPU masked-MSE forward summing in the CUDA kernel's order (its bits equal
the CPU walk of the CUDA body)."""

import os
import subprocess
import sys

import pytest
import torch

from opensora_fast import build_info
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.reference import masked_mse as ref_mse

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="needs the native extension")

ISAS = ("baseline", "avx2", "avx512")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def OP():
    return torch.ops.opensora_fast


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    diff = (bits(a) != bits(b)).sum().item()
    assert diff == 0, f"{msg}: {diff} of {a.numel()} elements differ"


def supported() -> list[str]:
    """The variants this CPU runs (the switch refuses the others)."""
    have = []
    prev = OP()._cpu_isa()
    try:
        for isa in ISAS:
            try:
                OP()._cpu_isa(isa)
                have.append(isa)
            except ValueError:
                pass
    finally:
        OP()._cpu_isa(prev)
    return have


@pytest.fixture
def each_isa():
    """Calls fn() under every supported variant; returns {isa: result}."""
    prev = OP()._cpu_isa()

    def run(fn):
        out = {}
        for isa in supported():
            OP()._cpu_isa(isa)
            out[isa] = fn()
        OP()._cpu_isa(prev)
        return out

    yield run
    OP()._cpu_isa(prev)


def specials(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values with NaN, infinities, signed zeros and subnormals (of dtype and of fp32) mixed in."""
    x = torch.randn(n, generator=gen)
    if n == 0:
        return x.to(dtype)
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 1e-45, 6e-8, 1e-5])
    idx = torch.randint(0, n, (max(n // 7, 1),), generator=gen)
    x[idx] = odd[torch.randint(0, len(odd), idx.shape, generator=gen)]
    return x.to(dtype)


# ---- the switch ---------------------------------------------------------------------


def test_switch_returns_previous_and_refuses_bad_names():
    prev = OP()._cpu_isa()
    assert prev in ISAS and build_info()["cpu_isa"] == prev
    assert OP()._cpu_isa("baseline") == prev
    try:
        assert OP()._cpu_isa() == "baseline" and build_info()["cpu_isa"] == "baseline"
        with pytest.raises(ValueError, match="isa must be 'baseline', 'avx2' or 'avx512', got 'sse9'"):
            OP()._cpu_isa("sse9")
        assert OP()._cpu_isa() == "baseline"  # unchanged by the refusal
    finally:
        OP()._cpu_isa(prev)
    if prev != "avx512":
        with pytest.raises(ValueError, match="this CPU runs at most"):
            OP()._cpu_isa("avx512")


def test_environment_variable_lowers_the_variant():
    code = "import opensora_fast; print(opensora_fast.build_info()['cpu_isa'])"
    for want in ("baseline", "bogus"):
        env = dict(os.environ, OPENSORA_FAST_CPU_ISA=want)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        # an unknown value is ignored: the widest variant
        assert out.stdout.split()[-1] == (want if want != "bogus" else supported()[-1])


# ---- the same bits in every variant ---------------------------------------------------


SIZES = [0, 1, 15, 33, 4099, 70001]


@pytest.mark.parametrize("edt", FLOATS, ids=str)
@pytest.mark.parametrize("sdt", FLOATS, ids=str)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ema_same_bits_in_every_variant(each_isa, edt, sdt, stochastic):
    gen = torch.Generator().manual_seed(3)
    ema = [specials(n, edt, gen) for n in SIZES]
    src = [specials(n, sdt, gen) for n in SIZES]
    ema.append(torch.randn(1001, generator=gen).to(edt)[1:])  # storage offset: unaligned
    src.append(torch.randn(1003, generator=gen).to(sdt)[3:])

    def run():
        e = [x.clone() for x in ema]
        OP().ema_update_(e, src, 0.9, stochastic, 17)
        return e

    out = each_isa(run)
    for isa, got in out.items():
        for i, (a, b) in enumerate(zip(got, out["baseline"])):
            same(a, b, f"{isa} {edt}<-{sdt} [{i}]")


@pytest.mark.parametrize("edt", FLOATS, ids=str)
@pytest.mark.parametrize("amsgrad", [0, 1])
def test_adamw_ema_same_bits_in_every_variant(each_isa, edt, amsgrad):
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 17, 600, 4099]
    p = [torch.randn(n, generator=gen) for n in sizes]
    g = [specials(n, torch.float32, gen) for n in sizes]
    m = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    v = [torch.randn(n, generator=gen).square() * 0.01 for n in sizes]
    vm = [x * 1.01 for x in v] if amsgrad else []
    ema = [torch.randn(n, generator=gen).to(edt) for n in sizes]

    def run():
        ts = [[x.clone() for x in lst] for lst in (p, m, v, vm, ema)]
        pp, mm, vv, vvm, ee = ts
        steps = [torch.tensor(3.0) for _ in sizes]
        OP().adamw_ema_(
            pp, g, mm, vv, vvm, steps, [len(sizes)], [1e-3], [0.9], [0.999], [1e-8], [0.1], [amsgrad], [0], ee, pp, 0.99
        )
        return [x for lst in ts for x in lst]

    out = each_isa(run)
    for isa, got in out.items():
        for i, (a, b) in enumerate(zip(got, out["baseline"])):
            same(a, b, f"{isa} [{i}]")


@pytest.mark.parametrize("odt", FLOATS + (torch.float64,), ids=str)
@pytest.mark.parametrize("sdt", FLOATS + (torch.float64,), ids=str)
def test_condition_same_bits_in_every_variant(each_isa, odt, sdt):
    gen = torch.Generator().manual_seed(7)
    B, C, T, H, W = 2, 3, 5, 9, 11  # dense source frames: the converting loop
    z = torch.zeros(B, C, T, H, W, dtype=odt)
    src = [specials(C * 6 * H * W, sdt, gen).view(C, 6, H, W)]
    plan = [0, 0, 4, 0, 1, 1, 2, 3, 0, 0]
    out = each_isa(lambda: OP().condition(z, src, plan))
    for isa, (masks, masked) in out.items():
        same(masks, out["baseline"][0], isa)
        same(masked, out["baseline"][1], isa)


MSE_CASES = [  # B, L, D, ranges: odd sizes, misaligned chunk starts, several chunks, partial rounds
    (3, 3000, 7, [[0, 3000], [5, 2999], [1, 1]]),
    (2, 700, 64, [[0, 700], [100, 650]]),
    (2, 1025, 33, [[0, 1025], [3, 1000]]),
    (1, 5, 3, [[-4, 99]]),
    (4, 257, 17, [[0, 257], [1, 256], [0, 0], [250, 257]]),
]


@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=str)
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_masked_mse_forward_is_the_cuda_order_in_every_variant(each_isa, dtype, case):
    # _masked_mse_grid_walk runs the CUDA kernel's per-thread body for every
    # (block, thread) and its shuffle tree on the CPU: the CPU op must give its bits.
    B, L, D, r = case
    gen = torch.Generator().manual_seed(B * L + D)
    p = torch.randn(B, L, D, generator=gen).to(dtype)
    t = torch.randn(B, L, D, generator=gen).to(dtype)
    ranges = torch.tensor(r)
    g = torch.tensor(0.75)
    walk_loss, walk_grad = OP()._masked_mse_grid_walk(g, p, t, ranges)
    out = each_isa(lambda: (OP().masked_mse(p, t, ranges), OP().masked_mse_backward(g, p, t, ranges)))
    want = ref_mse.masked_mse(p, t, ranges)
    for isa, (loss, grad) in out.items():
        same(loss, walk_loss, f"{isa} loss")
        same(grad, walk_grad, f"{isa} grad")
        if torch.isnan(want):
            assert torch.isnan(loss)
        else:
            torch.testing.assert_close(loss, want, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


def order_sensitive(B, L, D, dtype, gen, mode):
    """pred, target whose loss shows any change of summation order: "lane": in each
    chunk only one GPU thread's elements differ, each by its own power of two (the
    partial is that thread's rounded sum, exactly); "tree": each thread's
    differences scaled by its own power of two (the block tree's order shows)."""
    V, chunk = 16 // torch.empty((), dtype=dtype).element_size(), 16384
    p = torch.randn(B, L * D, generator=gen, dtype=torch.float64)
    d = torch.randn(B, L * D, generator=gen, dtype=torch.float64)
    j = torch.arange(L * D)
    thread = (j % chunk) // V % 256
    span = 4
    if mode == "lane":  # each element its own scale: the thread's sum rounds at every step
        pick = torch.randint(0, 256, (B, L * D // chunk + 1), generator=gen)
        d = (
            d
            * (thread == pick[:, j // chunk])
            * torch.exp2(torch.randint(-span, span, d.shape, generator=gen).double())
        )
    else:
        d = d * torch.exp2(torch.randint(-span, span, (256,), generator=gen).double())[thread]
    pred = p.to(dtype)
    return pred.view(B, L, D), (pred.double() + d).to(dtype).view(B, L, D)


@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=str)
@pytest.mark.parametrize("mode", ["lane", "tree"])
def test_masked_mse_forward_cuda_order_where_order_shows(each_isa, dtype, mode):
    # With plain random data a different order inside one thread's sum mostly
    # vanishes below the total's last bit. Here one sample of one chunk of
    # 2^14 elements: the loss is the block's partial / 2^14, exactly.
    gen = torch.Generator().manual_seed(17)
    for trial in range(6):
        B, L, D = (1, 256, 64) if trial < 5 else (1, 257, 63)  # the last: partial round and group
        p, t = order_sensitive(B, L, D, dtype, gen, mode)
        ranges = torch.tensor([[0, L]])
        walk = OP()._masked_mse_grid_walk(torch.tensor(1.0), p, t, ranges)[0]
        for isa, loss in each_isa(lambda: OP().masked_mse(p, t, ranges)).items():
            same(loss, walk, f"{mode} trial {trial} {isa}")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_masked_mse_forward_cuda_order_with_special_values(each_isa, dtype):
    # subnormal differences, infinities and NaN go through the same order too
    gen = torch.Generator().manual_seed(11)
    B, L, D = 2, 300, 29
    p = specials(B * L * D, dtype, gen).view(B, L, D)
    t = specials(B * L * D, dtype, gen).view(B, L, D)
    t[0] = p[0] + specials(L * D, dtype, gen).view(L, D).nan_to_num(0, 0, 0) * 1e-3  # finite sample
    ranges = torch.tensor([[0, L], [7, 290]])
    walk = OP()._masked_mse_grid_walk(torch.tensor(1.0), p[:1], t[:1], ranges[:1])[0]
    for isa, loss in each_isa(lambda: OP().masked_mse(p[:1], t[:1], ranges[:1])).items():
        same(loss, walk, isa)
    for isa, loss in each_isa(lambda: OP().masked_mse(p, t, ranges)).items():
        assert torch.isnan(loss) or torch.isinf(loss), isa


def test_masked_mse_forward_at_every_byte_offset(each_isa):
    # the AVX-512 build takes 64-byte-aligned chunks, the others the 32-byte one
    gen = torch.Generator().manual_seed(13)
    B, L, D = 2, 130, 64
    for dtype in (torch.float32, torch.bfloat16):
        p0, t0 = torch.randn(B, L, D, generator=gen).to(dtype), torch.randn(B, L, D, generator=gen).to(dtype)
        ranges = torch.tensor([[0, L], [2, L]])
        walk = OP()._masked_mse_grid_walk(torch.tensor(1.0), p0, t0, ranges)[0]
        for off in range(0, 64 // p0.element_size(), 3):
            bp = torch.empty(p0.numel() + 64, dtype=dtype)
            p = bp[off : off + p0.numel()].view(B, L, D)
            p.copy_(p0)
            for isa, loss in each_isa(lambda: OP().masked_mse(p, t0, ranges)).items():
                same(loss, walk, f"{dtype} offset {off} {isa}")
