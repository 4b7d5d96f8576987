"""EMA op: native kernels vs the upstream formula / the reference."""

import math
import os

import pytest
import torch
from helpers import FLOATS, PAIRS, assert_bitwise_equal, rand, shard_sizes

import opensora_fast
from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE

# Only a declared pure-Python install skips; a build that silently failed must fail here.
pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
SIZES = [0, 1, 3, 4099, 2**20 + 3]
DECAYS = [0.9999, 0.99, 0.5, 0.0, 1.0]


def upstream(ema, src, decay):
    for e, s in zip(ema, src):
        e.mul_(decay).add_(s, alpha=1 - decay)


def assert_matches_upstream(got, want, msg=""):
    """Bitwise, with one documented exception. When ema and src share a reduced
    dtype (bf16/bf16, fp16/fp16), torch's CPU add computes its vectorised body
    as R(fma(src, R(alpha), e1)) -- the rule we follow for every element -- but
    the scalar remainder of each of its thread chunks (fewer than two vectors,
    i.e. < 64 elements even with AVX-512) as R(e1 + R(R(alpha) * src)). Those
    few elements may differ by 1 ulp; which ones depends on torch's threads and
    CPU vector width, not on the data."""
    if not (msg.startswith("bf16/bf16") or msg.startswith("fp16/fp16")):
        return assert_bitwise_equal(got, want, msg)
    diff = got.float() != want.float()
    assert int(diff.sum()) <= 64 * max(torch.get_num_threads(), 1), msg
    ulp = torch.finfo(got.dtype).eps * want.float().abs().clamp_min(torch.finfo(got.dtype).tiny)
    assert bool(((got.float() - want.float()).abs() <= ulp)[diff].all()), msg


def tag(edt, sdt):
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"{name[edt]}/{name[sdt]}"


@pytest.mark.parametrize("edt,sdt", PAIRS)
@pytest.mark.parametrize("n", SIZES)
def test_compat_bit_exact_vs_upstream(edt, sdt, n):
    g = torch.Generator().manual_seed(n * 31 + FLOATS.index(edt) * 3 + FLOATS.index(sdt))
    e0, s = rand(n, edt, g), rand(n, sdt, g, scale=3.0)
    for decay in DECAYS if n < 5000 else [0.9999, 0.9]:
        want, got = e0.clone(), e0.clone()
        upstream([want], [s], decay)
        torch.ops.opensora_fast.ema_update_([got], [s], decay)
        assert_matches_upstream(got, want, f"{tag(edt, sdt)} n={n} decay={decay}")


@pytest.mark.parametrize("limits", [(0, 0), (5, 7)], ids=["cuda-limits", "tiny-tables"])
@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_grid_walk_matches_upstream(edt, sdt, limits):
    # The CUDA kernel's per-thread body over its whole launch grid, on the CPU:
    # tails, misaligned views (offset 1), tables split by tensor count and by
    # block count, mid-tensor (tiny limits: 5 tensors / 7 blocks per launch).
    g = torch.Generator().manual_seed(7)
    sizes = [1, 3, 4099, 32768, 32769, 20 * 32768 + 5] + [64] * 300
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    big = rand(5000, edt, g)
    ema.append(big[1:])  # storage offset 1: not 16-byte aligned
    src.append(rand(5000, sdt, g)[1:])  # misaligned on the source side too
    want = [e.clone() for e in ema]
    upstream(want, src, 0.999)
    torch.ops.opensora_fast._ema_update_grid_walk_(ema, src, 0.999, False, 0, *limits)
    for i, (a, b) in enumerate(zip(ema, want)):
        assert_matches_upstream(a, b, f"{tag(edt, sdt)} pair {i}")
    # stochastic rounding is independent of the launch geometry
    seeded = [e.clone() for e in want]
    walked = [e.clone() for e in want]
    torch.ops.opensora_fast.ema_update_(seeded, src, 0.9999, True, 99)
    torch.ops.opensora_fast._ema_update_grid_walk_(walked, src, 0.9999, True, 99, *limits)
    for i, (a, b) in enumerate(zip(walked, seeded)):
        assert_bitwise_equal(a, b, f"stochastic pair {i}")


def test_1082_tensor_shard_list_mixed_dtypes():
    g = torch.Generator().manual_seed(1)
    sizes = shard_sizes(4096)
    assert len(sizes) == 1082
    ema = [rand(n, FLOATS[i % 3], g) for i, n in enumerate(sizes)]
    src = [rand(n, FLOATS[(i // 3) % 3], g) for i, n in enumerate(sizes)]
    want = [e.clone() for e in ema]
    upstream(want, src, 0.9999)
    ops.ema_update_(ema, src, 0.9999)
    for i, (a, b, s) in enumerate(zip(ema, want, src)):
        assert_matches_upstream(a, b, f"{tag(a.dtype, s.dtype)} pair {i}")


@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_stochastic_native_equals_reference(edt, sdt):
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 3, 4099, 70001]
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    ref = [e.clone() for e in ema]
    torch.ops.opensora_fast.ema_update_(ema, src, 0.9999, True, 12345)
    reference.ema.ema_update_(ref, src, 0.9999, True, 12345)
    for i, (a, b) in enumerate(zip(ema, ref)):
        assert_bitwise_equal(a, b, f"pair {i}")


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    # Each result is one of the two bf16 neighbours of the exact fp32 value, and
    # the mean over many draws is the fp32 value.
    n = 200_000
    e = torch.full((n,), 1.0, dtype=torch.bfloat16)
    s = torch.full((n,), 1.5, dtype=torch.float32)
    exact = 1.0 * 0.99 + 1.5 * 0.01  # 1.005, between bf16 1.0 and 1.0078125
    ops.ema_update_([e], [s], 0.99, stochastic=True, seed=5)
    vals = set(e.float().unique().tolist())
    assert vals <= {1.0, 1.0078125} and len(vals) == 2
    assert abs(e.float().mean().item() - exact) < 2e-4


def test_stochastic_seed_reproducible_and_generator_draws():
    x = torch.randn(10000).bfloat16()
    s = torch.randn(10000)
    a, b, c = x.clone(), x.clone(), x.clone()
    ops.ema_update_([a], [s], 0.999, stochastic=True, seed=1)
    ops.ema_update_([b], [s], 0.999, stochastic=True, seed=1)
    ops.ema_update_([c], [s], 0.999, stochastic=True, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    d, e = x.clone(), x.clone()
    ops.ema_update_([d], [s], 0.999, stochastic=True, generator=g1)
    ops.ema_update_([e], [s], 0.999, stochastic=True, generator=g2)
    assert torch.equal(d, e)


def test_stochastic_bf16_ema_tracks_fp32_where_compat_stalls():
    # decay 0.9999: the per-step increment (~1e-4) is far below half a bf16 ulp
    # at 1.0 (0.0039), so round-to-nearest never moves; stochastic rounding does.
    g = torch.Generator().manual_seed(0)
    n, steps, decay = 4096, 3000, 0.9999
    start = (1.0 + 0.5 * torch.rand(n, generator=g)).bfloat16()
    target = start.float() + 1.0
    fp32, compat, sr = start.float(), start.clone(), start.clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ops.ema_update_([fp32, compat, sr], [target] * 3, decay)  # fp32 EMA and compat
        sr_prev = sr  # (same list call cannot mix modes)
        ops.ema_update_([sr_prev], [target], decay, stochastic=True, generator=gen)
    moved = (fp32 - start.float()).mean().item()
    assert moved > 0.2  # 1 - 0.9999**3000 = 0.259
    assert torch.equal(compat, start)  # stalled: not one element changed
    err = (sr.float() - fp32).mean().abs().item()
    assert err < 0.02 * moved, (err, moved)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    ema = [rand(n, torch.bfloat16, g) for n in (5, 1000)]
    src = [rand(n, torch.float32, g) for n in (5, 1000)]
    torch.library.opcheck(torch.ops.opensora_fast.ema_update_.default, (ema, src, 0.99, False, 0))
    torch.library.opcheck(torch.ops.opensora_fast.ema_update_.default, (ema, src, 0.99, True, 3))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    ema = [rand(n, torch.bfloat16, g) for n in (17, 4099)]
    src = [rand(n, torch.float32, g) for n in (17, 4099)]
    want = [e.clone() for e in ema]
    upstream(want, src, 0.999)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ema, src):
        ops.ema_update_(ema, src, 0.999)

    step(ema, src)
    for a, b in zip(ema, want):
        assert_bitwise_equal(a, b)


def test_empty_inputs_are_fine():
    ops.ema_update_([], [], 0.9)
    e = torch.empty(0, dtype=torch.bfloat16)
    ops.ema_update_([e], [torch.empty(0)], 0.9)
    torch.ops.opensora_fast.ema_update_([e], [torch.empty(0)], 0.9)


def _bad_cases():
    f = lambda n, dt=torch.float32: torch.zeros(n, dtype=dt)  # noqa: E731
    return [
        ("len", [f(3)], [f(3), f(3)], 0.9, ValueError, "len(ema)=1"),
        ("numel", [f(3), f(4)], [f(3), f(5)], 0.9, ValueError, "ema[1] has shape [4] but src[1] has shape [5]"),
        ("shape", [f(3), torch.zeros(2, 3)], [f(3), f(6)], 0.9, ValueError, "ema[1] has shape [2, 3]"),
        ("int ema", [f(3), f(3, torch.int32)], [f(3), f(3)], 0.9, TypeError, "ema[1] has dtype"),
        ("int src", [f(3), f(3)], [f(3), f(3, torch.int64)], 0.9, TypeError, "src[1] has dtype"),
        ("ema strided", [f(3), torch.zeros(3, 2)[:, 0]], [f(3), f(3)], 0.9, ValueError, "ema[1] is not contiguous"),
        ("src strided", [f(3), f(3)], [f(3), torch.zeros(3, 2)[:, 0]], 0.9, ValueError, "src[1] is not contiguous"),
        ("decay>1", [f(3)], [f(3)], 1.5, ValueError, "decay must be in [0, 1]"),
        ("decay<0", [f(3)], [f(3)], -0.1, ValueError, "decay must be in [0, 1]"),
        ("decay nan", [f(3)], [f(3)], math.nan, ValueError, "decay must be in [0, 1]"),
        ("meta device", [f(3), f(3)], [f(3), torch.zeros(3, device="meta")], 0.9, ValueError, "src[1] is on meta"),
    ]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_and_writes_nothing(case, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    _, ema, src, decay, exc, text = case
    ema[0].fill_(1.0)
    src[0].fill_(2.0)
    with pytest.raises(exc) as info:
        ops.ema_update_(ema, src, decay)
    assert text in str(info.value)
    assert torch.all(ema[0] == 1.0), "the valid pair before the bad one was written"


def test_bad_input_direct_op_call_is_a_python_exception():
    with pytest.raises(ValueError, match=r"ema\[0\] has shape"):
        torch.ops.opensora_fast.ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(TypeError, match=r"ema\[0\] has dtype"):
        torch.ops.opensora_fast.ema_update_([torch.zeros(3, dtype=torch.int8)], [torch.zeros(3)], 0.9)


def test_backend_reference_forced_matches_native(monkeypatch, caplog):
    g = torch.Generator().manual_seed(2)
    ema = [rand(n, torch.bfloat16, g) for n in (3, 4099)]
    src = [rand(n, torch.float32, g) for n in (3, 4099)]
    a = [e.clone() for e in ema]
    ops.ema_update_(a, src, 0.9)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    monkeypatch.setattr(opensora_fast._ext, "_told", set())  # as in a fresh process
    b = [e.clone() for e in ema]
    with caplog.at_level("WARNING", logger="opensora_fast"):
        ops.ema_update_(b, src, 0.9)
        ops.ema_update_([e.clone() for e in ema], src, 0.9)
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)
    # said once, not per call
    assert sum("OPENSORA_FAST_BACKEND=reference" in r.message for r in caplog.records) == 1


def test_backend_setting_validated(monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="OPENSORA_FAST_BACKEND"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9)


def test_backend_native_without_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    with pytest.raises(RuntimeError, match="cannot run natively on meta"):
        ops.ema_update_([torch.zeros(2, device="meta")], [torch.zeros(2, device="meta")], 0.9)


def test_info_reports_build():
    info = opensora_fast.build_info()
    for key in ("version", "torch", "native", "cuda_kernels", "cuda_archs", "ops"):
        assert key in info
    assert info["native"] is True
    assert "opensora_fast::ema_update_" in info["ops"]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("edt,sdt", PAIRS)
def test_cuda_parity(edt, sdt):
    g = torch.Generator().manual_seed(11)
    sizes = [0, 1, 3, 4099, 2**20 + 3, 32768 * 330 + 1]
    ema = [rand(n, edt, g) for n in sizes]
    src = [rand(n, sdt, g) for n in sizes]
    want = [e.clone() for e in ema]
    torch.ops.opensora_fast.ema_update_(want, src, 0.9999)  # our CPU op: the same arithmetic
    dev_e = [e.cuda() for e in ema]
    dev_s = [s.cuda() for s in src]
    torch_cuda = [e.clone() for e in dev_e]
    upstream(torch_cuda, dev_s, 0.9999)
    ops.ema_update_(dev_e, dev_s, 0.9999)
    for i, (a, b, c) in enumerate(zip(dev_e, want, torch_cuda)):
        assert_bitwise_equal(a, b, f"vs our CPU op, pair {i}")  # same arithmetic as the CPU
        # vs torch's own CUDA: identical, or one rounding of (1-d)*src apart
        # where it keeps alpha in fp32 (same reduced dtype on both sides)
        d = (a.float() - c.float()).abs()
        bound = torch.finfo(edt).eps * (c.float().abs() + (1e-4 * dev_s[i].float()).abs()) + torch.finfo(edt).tiny
        assert bool((d <= bound).all()), f"pair {i}"
    sr = [e.clone() for e in ema]
    sr_dev = [e.cuda() for e in ema]
    ops.ema_update_(sr, src, 0.9999, stochastic=True, seed=8)
    ops.ema_update_(sr_dev, dev_s, 0.9999, stochastic=True, seed=8)
    for a, b in zip(sr_dev, sr):
        assert_bitwise_equal(a, b, "stochastic CPU vs CUDA")


@pytest.mark.cuda
def test_cuda_no_host_sync():
    sizes = shard_sizes(96)[:200]
    ema = [torch.randn(n, device="cuda").bfloat16() for n in sizes]
    src = [torch.randn(n, device="cuda") for n in sizes]
    ops.ema_update_(ema, src, 0.9999)  # warm: first call may load things
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.ema_update_(ema, src, 0.9999)
        ops.ema_update_(ema, src, 0.9999, stochastic=True, seed=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"src\[0\] is on cpu"):
        ops.ema_update_([torch.zeros(3, device="cuda")], [torch.zeros(3)], 0.9)


# ------------------------------------------------- reliability round two (issue 17)


def _neg_view(n=1):
    """A contiguous float32 tensor with its neg bit set (x.conj().imag of a 1-element complex)."""
    t = torch.randn(n, dtype=torch.complex64).conj().imag
    assert t.is_neg() and t.is_contiguous()
    return t


def _lazy_and_layout_cases():
    """(name, ema, src, exception, message): views and layouts every way must refuse
    with one error, before pair 0 (a valid pair) is written."""
    z = lambda n=1: torch.zeros(n)  # noqa: E731
    nested = lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])  # noqa: E731
    return [
        (
            "neg ema",
            [z(3), _neg_view()],
            [z(3), z()],
            ValueError,
            "ema_update_: ema[1] is a negated view (neg bit set, as in x.conj().imag); pass a tensor without it",
        ),
        (
            "neg src",
            [z(3), z()],
            [z(3), _neg_view()],
            ValueError,
            "ema_update_: src[1] is a negated view (neg bit set, as in x.conj().imag); pass a tensor without it",
        ),
        (
            "conj ema",
            [z(3), torch.zeros(1, dtype=torch.complex64).conj()],
            [z(3), z()],
            TypeError,
            "ema_update_: ema[1] has dtype torch.complex64; expected float32, bfloat16 or float16",
        ),
        (
            "nested ema",
            [z(3), nested()],
            [z(3), nested()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "nested src",
            [z(3), z(5)],
            [z(3), nested()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "sparse src",
            [z(3), z(3)],
            [z(3), z(3).to_sparse()],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
        (
            "csr ema",
            [z(3), torch.zeros(2, 3).to_sparse_csr()],
            [z(3), torch.zeros(2, 3)],
            ValueError,
            "ema_update_: ema[1] and src[1] must be dense (strided) tensors",
        ),
    ]


def _fake(args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return mode, [[mode.from_tensor(t) for t in ts] for ts in args]


@pytest.mark.parametrize("way", ["raw op", "reference", "fake", "wrapper native", "wrapper reference"])
@pytest.mark.parametrize("case", _lazy_and_layout_cases(), ids=lambda c: c[0])
def test_lazy_views_and_layouts_one_error_nothing_written(case, way, monkeypatch):
    name, ema, src, exc, text = case
    ema[0].fill_(1.0)
    src[0].fill_(2.0)
    base = ema[1]._base if ema[1].is_neg() else None
    before = base.clone() if base is not None else None
    if way == "raw op":
        call = lambda: torch.ops.opensora_fast.ema_update_(ema, src, 0.5)  # noqa: E731
    elif way == "reference":
        call = lambda: reference.ema.ema_update_(ema, src, 0.5)  # noqa: E731
    elif way == "fake":
        if "nested" in name or "sparse" in name or "csr" in name:
            pytest.skip("FakeTensorMode does not convert this layout")
        mode, (fe, fs) = _fake((ema, src))

        def call():
            with mode:
                torch.ops.opensora_fast.ema_update_(fe, fs, 0.5)

    else:
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", way.split()[1])
        call = lambda: ops.ema_update_(ema, src, 0.5)  # noqa: E731
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).splitlines()[0].startswith(text)
    assert torch.all(ema[0] == 1.0), "pair 0 was written before the error"
    if base is not None:
        assert torch.equal(base, before), "the negated ema was written"


def test_jagged_nested_tensor_one_error_on_both_backends(monkeypatch):
    # A python tensor subclass without this op refuses it at dispatch (NotImplementedError):
    # the wrapper reports what the reference reports.
    for backend in ("native", "reference"):
        monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
        for ema_nested in (True, False):
            e0 = torch.ones(3)
            jag = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
            ema = [e0, jag if ema_nested else torch.ones(5)]
            src = [torch.full((3,), 2.0), jag.clone() if ema_nested else jag]
            with pytest.raises(ValueError, match=r"ema\[1\] and src\[1\] must be dense \(strided\) tensors"):
                ops.ema_update_(ema, src, 0.5)
            assert torch.all(e0 == 1.0), backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    "kwargs,text",
    [
        (dict(stochastic="False"), "ema_update_: stochastic must be a bool, got str"),
        (dict(stochastic=1), "ema_update_: stochastic must be a bool, got int"),
        (dict(stochastic=None), "ema_update_: stochastic must be a bool, got NoneType"),
        (dict(decay=True), "ema_update_: decay must be a real number, got bool"),
        (dict(decay=False), "ema_update_: decay must be a real number, got bool"),
        (dict(stochastic=True, seed=True), "ema_update_: seed must be an int, got bool"),
        (dict(seed=False), "ema_update_: seed must be an int, got bool"),  # compat mode: still checked
        (dict(stochastic=True, seed=1.0), "ema_update_: seed must be an int, got float"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else "",
)
def test_scalar_arguments_type_checked(kwargs, text, backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    e = torch.ones(4, dtype=torch.bfloat16)
    kwargs = dict(kwargs)
    decay = kwargs.pop("decay", 0.5)
    with pytest.raises(TypeError) as info:
        ops.ema_update_([e], [torch.full((4,), 2.0)], decay, **kwargs)
    assert str(info.value) == text
    assert torch.all(e == 1.0)


def _graph_recorder():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return graphs, backend


def _compiled_step():
    def step(ema, src):
        ops.ema_update_(ema, src, 0.9)

    return step


def test_compiled_choice_follows_backend_setting(monkeypatch, caplog):
    # The traced choice obeys OPENSORA_FAST_BACKEND, and a changed setting
    # retraces (dynamo guards on the environment read) instead of reusing the
    # graph traced under the other setting.
    torch._dynamo.reset()
    graphs, backend = _graph_recorder()
    f = torch.compile(_compiled_step(), backend=backend)
    src = [torch.linspace(-1, 1, 37)]
    want = [torch.zeros(37)]
    upstream(want, src, 0.9)

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "auto")
    ema = [torch.zeros(37)]
    f(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert any("opensora_fast" in g for g in graphs), "auto: the native op is traced"

    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    monkeypatch.setattr(opensora_fast._ext, "_told", set())
    graphs.clear()
    ema = [torch.zeros(37)]
    with caplog.at_level("WARNING", logger="opensora_fast"):
        f(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert not any("opensora_fast" in g for g in graphs), "reference: the native op was traced"
    assert any("OPENSORA_FAST_BACKEND=reference" in r.message for r in caplog.records), "the auto graph was reused"

    # and "native" where there is no kernel is the eager error, not a reused graph
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    monkeypatch.setitem(opensora_fast._ext._kernels, ("ema_update_", "cpu"), False)
    with pytest.raises(RuntimeError, match="cannot run natively on cpu"):
        f([torch.zeros(37)], src)
    torch._dynamo.reset()


def test_compiled_choice_follows_kernel_availability(monkeypatch):
    # As eager: no kernel for the traced tensors' device -> the reference, not
    # a graph that calls the op into its "no kernel" fallback.
    torch._dynamo.reset()
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "auto")
    monkeypatch.setitem(opensora_fast._ext._kernels, ("ema_update_", "cpu"), False)
    graphs, backend = _graph_recorder()
    src = [torch.linspace(-1, 1, 37)]
    ema, want = [torch.zeros(37)], [torch.zeros(37)]
    upstream(want, src, 0.9)
    torch.compile(_compiled_step(), backend=backend)(ema, src)
    assert_bitwise_equal(ema[0], want[0])
    assert graphs and not any("opensora_fast" in g for g in graphs)
    # and "native" without a kernel is the eager error, traced or not
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "native")
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="cannot run natively on cpu"):
            torch.compile(_compiled_step(), backend=backend, fullgraph=fullgraph)([torch.zeros(3)], [torch.ones(3)])
    torch._dynamo.reset()


def test_traced_choice_carries_the_constant_result_mark():
    """_ext marks _traced_choice by hand (no torch._dynamo import when the package
    loads); the public decorator must still mean exactly that mark."""
    from opensora_fast import _ext

    def probe():
        return 1

    assert torch.compiler.assume_constant_result(probe) is probe
    assert getattr(probe, "_dynamo_marked_constant", False) is True
    assert _ext._traced_choice._dynamo_marked_constant is True
