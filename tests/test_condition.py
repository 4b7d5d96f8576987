"""Conditioning op (torch.ops.opensora_fast.condition / condition_cat_): native CPU
kernel, CUDA grid walked on the CPU, and the CUDA kernel vs the reference, bit for
bit (the op only copies and converts, so exact); one table of bad inputs checked
three ways; opcheck; a property-based differential suite."""

import os

import pytest
import torch
from contract import WAYS, Contract, assert_three_way, faked, raw
from helpers import DEVICES, each_isa, needs_native, skip_without_native, with_specials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.ops.condition import condition_lists
from opensora_fast.reference.condition import canonical_nan

pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPS = torch.ops.opensora_fast if HAS_NATIVE else None


def bits(t):
    return t.contiguous().cpu().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same(a, b, msg=""):
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    assert torch.equal(bits(a), bits(b)), f"{msg}: {(bits(a) != bits(b)).sum().item()} elements differ"


def strided_source(C, Ts, H, W, dtype, gen, kind=0, device="cpu"):
    """[C, Ts, H, W] with a storage offset and non-trivial strides (kind 1, 2)."""
    if kind == 0:
        return torch.randn(C, Ts, H, W, generator=gen).to(dtype).to(device)
    if kind == 1:  # sliced out of a bigger tensor: offset, padded strides
        return torch.randn(C + 1, Ts + 2, H + 1, W + 3, generator=gen).to(dtype).to(device)[1:, 2:, :H, 1 : W + 1]
    return torch.randn(W, H, Ts, C, generator=gen).to(dtype).to(device).permute(3, 2, 1, 0)  # fully transposed


def run_both(op, out, sources, plan):
    """(native result, reference result) for "condition" or "condition_cat_"."""
    if op == "condition":
        return OPS.condition(out, sources, plan), reference.condition.condition(out, sources, plan)
    a, b = out.clone(), out.clone()
    OPS.condition_cat_(a, sources, plan)
    reference.condition.condition_cat_(b, sources, plan)
    return (a,), (b,)


def check_parity(op, out, sources, plan, msg=""):
    got, want = run_both(op, out, sources, plan)
    for g, w in zip(got, want):
        same(g, w, msg)
    return got


# ---- results ------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("src_dtype", DTYPES)
def test_every_dtype_pair(out_dtype, src_dtype):
    gen = torch.Generator().manual_seed(1)
    B, C, T, H, W = 3, 5, 7, 4, 6
    z = torch.randn(B, C, T, H, W, generator=gen).to(out_dtype)
    srcs = [strided_source(C, 9, H, W, src_dtype, gen, k) for k in range(3)]
    plan = [0, 0, 2, 0, 3, 0, 5, 2, 2, 7, 2, 1, 6, 1, 0, 2, 0, 1, 1, 8]  # sample 1 untouched
    masks, masked = check_parity("condition", z, srcs, plan, f"{out_dtype}<-{src_dtype}")
    assert masks.dtype == out_dtype and masks.shape == (B, 1, T, H, W)
    assert masks[0, 0, :, 0, 0].tolist() == [1, 1, 0, 0, 0, 1, 1] and not masks[1].any()
    # exact values: the source frames converted as torch converts them
    same(masked[2, :, 1:7], srcs[1][:, 0:6].to(out_dtype))
    same(masked[0, :, 5:7], srcs[2][:, 7:9].to(out_dtype))
    same(masked[2, :, 0], srcs[1][:, 8].to(out_dtype))
    cond = torch.full((B, 1 + C, T, H, W), 7.0, dtype=out_dtype)
    (c,) = check_parity("condition_cat_", cond, srcs, plan)
    same(c[:, :1], masks)
    same(c[:, 1:], masked)


@pytest.mark.parametrize("shape", [(0, 3, 4, 2, 2), (2, 0, 4, 2, 2), (2, 3, 4, 0, 5), (1, 1, 1, 1, 1)], ids=str)
def test_empty_and_tiny(shape):
    B, C, T, H, W = shape
    z = torch.randn(shape)
    srcs = [torch.randn(C, 2, H, W)]
    plan = [0, 0, 1, 0, 1] if B else []
    check_parity("condition", z, srcs, plan, str(shape))
    check_parity("condition_cat_", torch.randn(B, 1 + C, T, H, W), srcs, plan, str(shape))


def test_large_planes_many_chunks_and_threads():
    gen = torch.Generator().manual_seed(2)
    B, C, T, H, W = 2, 3, 6, 96, 100  # 9600-element planes: several kChunk chunks per piece
    z = torch.empty(B, C, T, H, W, dtype=torch.bfloat16)
    srcs = [torch.randn(C, 6, H, W, generator=gen), strided_source(C, 6, H, W, torch.float16, gen, 2)]
    plan = [0, 1, 4, 0, 2, 1, 0, 6, 1, 0]
    check_parity("condition", z, srcs, plan)
    check_parity("condition_cat_", torch.empty(B, 1 + C, T, H, W), srcs, plan)


# ---- the CUDA body, walked on the CPU ----------------------------------------------------


def walk(z, srcs, plan, cat=False, **limits):
    B, C, T, H, W = z.shape
    if cat:
        cond = torch.full((B, 1 + C, T, H, W), 5.0, dtype=z.dtype)
        OPS._condition_grid_walk_(cond[:, :1], cond[:, 1:], srcs, plan, **limits)
        return cond[:, :1], cond[:, 1:]
    masks = torch.full((B, 1, T, H, W), 5.0, dtype=z.dtype)
    masked = torch.full((B, C, T, H, W), 5.0, dtype=z.dtype)
    OPS._condition_grid_walk_(masks, masked, srcs, plan, **limits)
    return masks, masked


@pytest.mark.parametrize(
    "limits",
    [
        dict(),
        dict(max_pieces=1),
        dict(max_sources=1),
        dict(max_blocks=1),
        dict(max_pieces=2, max_sources=1, max_blocks=3),
        dict(small_table=True),
        dict(small_table=True, max_blocks=2),
    ],
    ids=str,
)
def test_grid_walk_matches_reference(limits):
    gen = torch.Generator().manual_seed(3)
    B, C, T, H, W = 3, 2, 5, 91, 97  # 8827-element planes: a piece of n frames has ~n+1 chunks
    z = torch.empty(B, C, T, H, W, dtype=torch.float16)
    srcs = [
        strided_source(C, 5, H, W, dt, gen, k % 3)
        for k, dt in enumerate([torch.float32, torch.bfloat16, torch.float64, torch.float32])
    ]
    plan = [0, 0, 2, 0, 0, 0, 4, 1, 3, 1, 2, 3, 2, 1, 2, 2, 0, 1, 3, 4, 1, 4, 1, 1, 0]
    want = reference.condition.condition(z, srcs, plan)
    for cat in (False, True):
        got = walk(z, srcs, plan, cat, **limits)
        for g, w in zip(got, want):
            same(g, w, f"walk cat={cat} {limits}")


# ---- the contract: one table of bad inputs, three ways ------------------------------


def _bad_cases():
    z = torch.zeros(2, 3, 4, 5, 6)
    cond = torch.zeros(2, 4, 4, 5, 6)
    ok = [torch.zeros(3, 4, 5, 6)]
    row = [0, 0, 1, 0, 0]
    V, T_ = ValueError, TypeError
    return [
        # (id, op, out, sources, plan, exception, message)
        ("z-4d", "condition", z[0], ok, row, V, "condition: z must be [B, C, T, H, W], got shape [3, 4, 5, 6]"),
        ("z-int", "condition", z.long(), ok, row, T_, "condition: z must be float32, bfloat16, float16 or float64"),
        (
            "cond-no-mask-channel",
            "condition_cat_",
            cond[:, :0],
            [],
            [],
            V,
            "condition_cat_: cond must be [B, 1 + C, T, H, W], got shape [2, 0, 4, 5, 6]",
        ),
        ("cond-strided", "condition_cat_", cond[..., ::2], [], [], V, "condition_cat_: cond must be contiguous"),
        (
            "cond-int",
            "condition_cat_",
            cond.int(),
            ok,
            row,
            T_,
            "condition_cat_: cond must be float32, bfloat16, float16 or float64",
        ),
        (
            "src-3d",
            "condition",
            z,
            [ok[0], ok[0][0]],
            row,
            V,
            "condition: sources[1] must be [C, T, H, W], got shape [4, 5, 6]",
        ),
        (
            "src-int",
            "condition",
            z,
            [ok[0].to(torch.int32)],
            row,
            T_,
            "condition: sources[0] must be float32, bfloat16, float16 or float64",
        ),
        (
            "src-channels",
            "condition",
            z,
            [torch.zeros(4, 4, 5, 6)],
            row,
            V,
            "condition: sources[0] has shape [4, 4, 5, 6]; expected [C, *, H, W] = [3, *, 5, 6]",
        ),
        (
            "src-height",
            "condition",
            z,
            [torch.zeros(3, 4, 6, 6)],
            row,
            V,
            "condition: sources[0] has shape [3, 4, 6, 6]; expected [C, *, H, W] = [3, *, 5, 6]",
        ),
        (
            "src-width",
            "condition_cat_",
            cond,
            [torch.zeros(3, 4, 5, 5)],
            row,
            V,
            "condition_cat_: sources[0] has shape [3, 4, 5, 5]; expected [C, *, H, W] = [3, *, 5, 6]",
        ),
        (
            "src-aliases-cond",
            "condition_cat_",
            cond,
            [cond[0, 1:]],
            row,
            V,
            "condition_cat_: sources[0] shares memory with cond",
        ),
        (
            "plan-len",
            "condition",
            z,
            ok,
            [0, 0, 1, 0],
            V,
            "condition: plan must hold rows of 5 ints (sample, frame, count, source, source_frame), got 4 ints",
        ),
        (
            "plan-sample-high",
            "condition",
            z,
            ok,
            row + [2, 0, 1, 0, 0],
            V,
            "condition: plan row 1: sample 2 is outside [0, 2)",
        ),
        (
            "plan-sample-neg",
            "condition",
            z,
            ok,
            [-1, 0, 1, 0, 0],
            V,
            "condition: plan row 0: sample -1 is outside [0, 2)",
        ),
        (
            "plan-count-0",
            "condition",
            z,
            ok,
            [0, 0, 0, 0, 0],
            V,
            "condition: plan row 0: frame 0, count 0 do not fit in T=4",
        ),
        (
            "plan-frames-past-T",
            "condition",
            z,
            ok,
            [1, 2, 3, 0, 0],
            V,
            "condition: plan row 0: frame 2, count 3 do not fit in T=4",
        ),
        (
            "plan-frame-neg",
            "condition",
            z,
            ok,
            [1, -1, 1, 0, 0],
            V,
            "condition: plan row 0: frame -1, count 1 do not fit in T=4",
        ),
        ("plan-source", "condition", z, ok, [0, 0, 1, 1, 0], V, "condition: plan row 0: source 1 is outside [0, 1)"),
        (
            "plan-source-frames",
            "condition_cat_",
            cond,
            ok,
            [0, 1, 3, 0, 2],
            V,
            "condition_cat_: plan row 0: source_frame 2, count 3 do not fit in sources[0] with 4 frames",
        ),
        (
            "plan-overlap",
            "condition",
            z,
            ok,
            [1, 2, 2, 0, 0, 0, 0, 1, 0, 0, 1, 0, 3, 0, 0],
            V,
            "condition: plan rows 0 and 2 overlap (sample 1)",
        ),
        (
            "plan-overlap-same-start",
            "condition",
            z,
            ok,
            [0, 1, 1, 0, 0, 0, 1, 2, 0, 0],
            V,
            "condition: plan rows 0 and 1 overlap (sample 0)",
        ),
        # the dispatcher's NotImplementedError came natively before the checks
        ("z-sparse", "condition", z.to_sparse(), ok, row, V, "condition: z must be a dense (strided) tensor"),
        (
            "src-sparse",
            "condition",
            z,
            [ok[0].to_sparse()],
            row,
            V,
            "condition: sources[0] must be a dense (strided) tensor",
        ),
        (
            "cond-sparse",
            "condition_cat_",
            cond.to_sparse(),
            ok,
            row,
            V,
            "condition_cat_: cond must be a dense (strided) tensor",
        ),
        (
            "src-sparse-cat",
            "condition_cat_",
            cond,
            [ok[0].to_sparse()],
            row,
            V,
            "condition_cat_: sources[0] must be a dense (strided) tensor",
        ),
        # an address range inside cond's (a strided view of it)
        (
            "src-strided-inside-cond",
            "condition_cat_",
            cond,
            [cond[1, 1:, :, :, :].transpose(2, 3).transpose(2, 3)],
            row,
            V,
            "condition_cat_: sources[0] shares memory with cond",
        ),
    ]


BAD = _bad_cases()


CONDITION = {
    op: Contract({"native": raw(op), "reference": getattr(reference.condition, op), "fake": faked(raw(op))})
    for op in ("condition", "condition_cat_")
}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_three_ways(case):
    _, op, out, sources, plan, exc, message = case
    out = out.clone() if op == "condition_cat_" and out.is_contiguous() and not sources else out
    # the same tensors each way (fakes made from views of one storage keep their aliasing)
    assert_three_way(CONDITION[op], "native", lambda: (out, sources, plan), exc, message, exact=True)


def _nested(*shapes):
    import warnings

    with warnings.catch_warnings():  # "nested tensors are a prototype"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.zeros(s) for s in shapes])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nested_inputs_are_a_value_error(backend, monkeypatch):
    """Natively the dispatcher said NotImplementedError, the reference a torch
    internal error; both now the checks' ValueError (FakeTensorMode cannot
    convert a strided nested tensor, so no fake way)."""
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    z, cond, ok, row = (
        torch.zeros(2, 3, 4, 5, 6),
        torch.zeros(2, 4, 4, 5, 6),
        [torch.zeros(3, 4, 5, 6)],
        [0, 0, 1, 0, 0],
    )
    nz, ns = _nested((3, 4, 5, 6), (3, 4, 5, 6)), _nested((4, 5, 6), (4, 5, 6))
    cases = [
        (lambda: ops.condition(nz, ok, row), "condition: z must be a dense (strided) tensor"),
        (lambda: ops.condition(z, [ns], row), "condition: sources[0] must be a dense (strided) tensor"),
        (lambda: ops.condition_cat_(nz, ok, row), "condition_cat_: cond must be a dense (strided) tensor"),
        (
            lambda: ops.condition_cat_(cond, [ok[0], ns], row),
            "condition_cat_: sources[1] must be a dense (strided) tensor",
        ),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError) as info:
            fn()
        assert str(info.value).split("\n")[0] == message
    assert not cond.any()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_non_tensors_and_values_outside_int64(backend, monkeypatch):
    """Natively the schema parser refused these with its own RuntimeError (the
    reference: AttributeError for None); both now the same TypeError/ValueError."""
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    z, cond, ok = torch.zeros(2, 3, 4, 5, 6), torch.zeros(2, 4, 4, 5, 6), [torch.zeros(3, 4, 5, 6)]
    cases = [
        (
            lambda: ops.condition(z, [None], [0, 0, 1, 0, 0]),
            TypeError,
            "condition: sources[0] must be a tensor, got NoneType",
        ),
        (
            lambda: ops.condition_cat_(cond, [ok[0], 1.0], [0, 0, 1, 0, 0]),
            TypeError,
            "condition_cat_: sources[1] must be a tensor, got float",
        ),
        (lambda: ops.condition(None, ok, [0, 0, 1, 0, 0]), TypeError, "condition: z must be a tensor, got NoneType"),
        (lambda: ops.condition_cat_([1.0], ok, []), TypeError, "condition_cat_: cond must be a tensor, got list"),
        (
            lambda: ops.condition(z, ok, [0, 0, 1, 0, 2**63]),
            ValueError,
            "condition: plan[4] = 9223372036854775808 does not fit in int64",
        ),
        (
            lambda: ops.condition_cat_(cond, ok, [0, 0, 1, 0, 0, -(2**63) - 1, 0, 1, 0, 0]),
            ValueError,
            "condition_cat_: plan[5] = -9223372036854775809 does not fit in int64",
        ),
        (
            lambda: condition_lists(z, ok, [2**64, 0, 1, 0, 0]),
            ValueError,
            "condition: plan[0] = 18446744073709551616 does not fit in int64",
        ),
    ]
    for fn, exc, message in cases:
        with pytest.raises(Exception) as info:
            fn()
        assert type(info.value) is exc and str(info.value).split("\n")[0] == message, repr(info.value)
    assert not cond.any()


def test_cat_source_sharing_bytes_through_another_storage():
    """Two tensors over one numpy buffer are two storages: the old is_alias_of
    check passed them and the backends then disagreed. Address ranges catch it,
    native and reference alike; disjoint ranges of one storage are fine."""
    import numpy as np

    buf = np.zeros(2 * 4 * 4 * 5 * 6 + 3 * 4 * 5 * 6, dtype=np.float32)
    cond = torch.from_numpy(buf)[: 2 * 4 * 4 * 5 * 6].view(2, 4, 4, 5, 6)
    inside = torch.from_numpy(buf)[600 : 600 + 360].view(3, 4, 5, 6)  # another storage, cond's bytes
    assert not torch._C._is_alias_of(inside, cond)
    for fn in (OPS.condition_cat_, reference.condition.condition_cat_, ops.condition_cat_):
        with pytest.raises(ValueError) as info:
            fn(cond, [torch.ones(3, 4, 5, 6), inside], [0, 0, 1, 1, 0])
        assert str(info.value).split("\n")[0] == "condition_cat_: sources[1] shares memory with cond"
        assert not buf.any()
    # the last element of a strided source reaches into cond by one element
    edge = torch.from_numpy(buf)[959 : 959 + 360].view(3, 4, 5, 6)  # its first element is cond's last
    assert edge.data_ptr() == cond[-1, -1, -1, -1, -1:].data_ptr()
    for fn in (OPS.condition_cat_, reference.condition.condition_cat_):
        with pytest.raises(ValueError, match=r"sources\[0\] shares memory with cond"):
            fn(cond, [edge], [0, 0, 1, 0, 0])
    # one storage, disjoint ranges: accepted, the same result both ways
    whole = torch.randn(2 * 4 * 4 * 5 * 6 + 360)
    c1 = whole[:960].view(2, 4, 4, 5, 6)
    src = whole[960:].view(3, 4, 5, 6)
    want = torch.cat(reference.condition.condition(torch.empty(2, 3, 4, 5, 6), [src.clone()], [1, 1, 3, 0, 1]), 1)
    for fn in (OPS.condition_cat_, reference.condition.condition_cat_):
        c1.fill_(7)
        fn(c1, [src], [1, 1, 3, 0, 1])
        same(c1, want, str(fn))


@pytest.mark.parametrize("op", ["condition", "condition_cat_"])
def test_sources_that_require_grad_are_refused_alike(op):
    """Natively the outputs claimed requires_grad but backward left the source
    grads None; the reference differentiated. Both now refuse in grad mode
    (ValueError naming sources) and run under no_grad, where nothing requires grad."""
    z, plan = torch.zeros(2, 3, 4, 5, 6), [0, 0, 2, 1, 1]
    srcs = [torch.ones(3, 4, 5, 6), torch.randn(3, 4, 5, 6, requires_grad=True)]
    message = (
        f"{op}: sources[1] requires grad and grad mode is on; {op} is not differentiable: "
        "detach the sources or call it under torch.no_grad()"
    )
    ways = Contract({**CONDITION[op].ways, "wrapper": getattr(ops, op)}, compare=(*WAYS, "wrapper"))
    args = (lambda: (z, srcs, plan)) if op == "condition" else (lambda: (torch.zeros(2, 4, 4, 5, 6), srcs, plan))
    assert_three_way(ways, "native", args, ValueError, message, exact=True)  # and cond left as it was
    for name in ("native", "reference", "wrapper"):
        fn, cond = ways.ways[name], torch.zeros(2, 4, 4, 5, 6)
        with torch.no_grad():
            if op == "condition":
                masks, masked = fn(z, srcs, plan)
                assert not masked.requires_grad and masked[0, :, 0:2].eq(srcs[1][:, 1:3]).all(), name
            else:
                fn(cond, srcs, plan)
                assert not cond.requires_grad and cond[0, 1:, 0:2].eq(srcs[1][:, 1:3]).all(), name


def test_z_that_requires_grad_gives_plain_outputs():
    """z's values are not read: the outputs carry no autograd history on either
    backend (natively they claimed requires_grad)."""
    z = torch.zeros(2, 3, 4, 5, 6, requires_grad=True)
    for fn in (OPS.condition, reference.condition.condition):
        masks, masked = fn(z, [torch.ones(3, 4, 5, 6)], [0, 0, 1, 0, 0])
        assert not masks.requires_grad and not masked.requires_grad and masked.grad_fn is None


def test_pieces_keep_64_bits():
    """Plan values past 2^31 (T, frames, source frames) reach the kernels
    unchanged: the old int32 pieces read 4 GiB before a source for
    source_frame >= 2^31, wrote nothing for T = 2^31 + 1 and the wrong frames
    for T = 2^32 + 2. No test can allocate such tensors; the private op returns
    the pieces the kernels (CPU and the CUDA body) run on."""
    P = OPS._condition_pieces
    T = 2**31 + 1
    assert P([0, 0, 1, 0, 2**31 + 5], 1, T).tolist() == [[0, 0, 1, 0, 2**31 + 5], [0, 1, 2**31, -1, 0]]
    T = 2**32 + 2
    got = P([1, 2**32, 2, 3, 2**40, 0, 1, 1, 0, 7], 2, T).tolist()
    assert got == [
        [0, 0, 1, -1, 0],
        [0, 1, 1, 0, 7],
        [0, 2, 2**32, -1, 0],
        [1, 0, 2**32, -1, 0],
        [1, 2**32, 2, 3, 2**40],
    ]
    assert P([], 3, 2**62).tolist() == [[b, 0, 2**62, -1, 0] for b in range(3)]


def test_huge_frame_counts_through_the_op():
    """An expanded source of 2^32 + 3 frames and an empty output plane with
    T = 2^40: checked in int64 and run (or returned) without allocating."""
    src = torch.randn(2, 1, 3, 4).expand(2, 2**32 + 3, 3, 4)
    z = torch.empty(1, 2, 3, 3, 4)
    plan = [0, 1, 2, 0, 2**32 + 1]
    for fn in (OPS.condition, reference.condition.condition):
        masks, masked = fn(z, [src], plan)
        same(masked[0, :, 1:], src[:, :2].contiguous())
        assert masks[0, 0, :, 0, 0].tolist() == [0, 1, 1]
    with pytest.raises(
        ValueError, match=r"source_frame 4294967297, count 3 do not fit in sources\[0\] with 4294967299 frames"
    ):
        OPS.condition(torch.empty(1, 2, 4, 3, 4), [src], [0, 1, 3, 0, 2**32 + 1])
    empty = torch.empty(2**20, 2, 2**40, 0, 4)  # no element: returned before any piece is made
    for fn in (OPS.condition, reference.condition.condition):
        masks, masked = fn(empty, [src[:, :, :0]], [5, 2**40 - 2, 2, 0, 2**32])
        assert masks.shape == (2**20, 1, 2**40, 0, 4) and masked.numel() == 0


def test_in_place_rules_like_torch():
    """condition_cat_ bumps cond's version counter, refuses a cond that requires grad
    in grad mode and an inference tensor outside inference mode: native and
    reference alike (same type, same message), nothing written."""
    src, plan = [torch.ones(3, 4, 5, 6)], [0, 0, 1, 0, 0]
    for fn in (OPS.condition_cat_, reference.condition.condition_cat_):
        cond = torch.zeros(2, 4, 4, 5, 6)
        v = cond._version
        fn(cond, src, plan)
        assert cond._version > v and cond[0, 0, 0].all()
        with torch.no_grad():
            fn(torch.zeros(2, 4, 4, 5, 6, requires_grad=True), src, plan)
        with torch.inference_mode():
            inf = torch.zeros(2, 4, 4, 5, 6)
            fn(inf, src, plan)
        assert inf[0, 1, 0].all()
    msgs = {}
    for name, fn in (("native", OPS.condition_cat_), ("reference", reference.condition.condition_cat_)):
        g = torch.zeros(2, 4, 4, 5, 6, requires_grad=True)
        with pytest.raises(RuntimeError) as e1:
            fn(g, src, plan)
        with pytest.raises(RuntimeError) as e2:
            fn(inf, src, plan)
        assert not g.detach().any() and not inf[:, 1:, 1:].any()
        msgs[name] = (str(e1.value).split("\n")[0], str(e2.value).split("\n")[0])
    assert msgs["native"] == msgs["reference"]
    assert "requires grad and grad mode is on" in msgs["native"][0]
    assert "inference tensor" in msgs["native"][1]


def test_saved_for_backward_then_written_raises():
    a = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    cond = torch.zeros(1, 2, 2, 2, 2)
    y = (a * cond).sum()  # saves cond
    with torch.no_grad():
        OPS.condition_cat_(cond, [torch.ones(1, 2, 2, 2)], [0, 0, 1, 0, 0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_is_canonical(dtype):
    """NaN sources (any sign, payload) come out as the one canonical NaN per dtype,
    from both backends; everything else exact (-0 kept)."""
    ints = {
        torch.float32: (torch.int32, [0x7FC00001, -4194304, 0x7F800001, -1]),
        torch.float64: (torch.int64, [0x7FF8000000000001, -2251799813685248, 0x7FF0000000000001, -1]),
        torch.bfloat16: (torch.int16, [0x7FC1, -64, 0x7F81, -1]),
        torch.float16: (torch.int16, [0x7E01, -512, 0x7C01, -1]),
    }
    for sdt in DTYPES:
        it, vals = ints[sdt]
        raw = torch.tensor(vals * 6, dtype=torch.int64).to(it).view(sdt).reshape(1, 4, 1, 6)
        raw[0, 0, 0, :3] = torch.tensor([-0.0, 1.5, float("inf")]).to(sdt)
        z = torch.empty(1, 1, 4, 1, 6, dtype=dtype)
        (_masks, got), want = (
            OPS.condition(z, [raw], [0, 0, 4, 0, 0]),
            reference.condition.condition(z, [raw], [0, 0, 4, 0, 0]),
        )
        same(got, want[1], f"{dtype}<-{sdt}")
        nan_bits = bits(canonical_nan(dtype, "cpu").reshape(1))
        isnan = got.isnan()
        assert isnan.sum() >= 20 and (bits(got)[isnan] == nan_bits).all()
        assert bits(got)[0, 0, 0, 0, 0] == bits(torch.tensor([-0.0], dtype=dtype))[0]


def test_good_input_passes_three_ways():
    z = torch.zeros(2, 3, 4, 5, 6)
    for way in WAYS:
        CONDITION["condition"].ways[way](z, [torch.ones(3, 4, 5, 6)], [1, 0, 4, 0, 0])


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 4, 4, generator=gen)
    srcs = [torch.randn(3, 6, 4, 4, generator=gen), strided_source(3, 5, 4, 4, torch.bfloat16, gen, 1)]
    plan = [0, 0, 2, 0, 1, 1, 4, 1, 1, 4]
    torch.library.opcheck(OPS.condition.default, (z, srcs, plan))
    torch.library.opcheck(OPS.condition_cat_.default, (torch.empty(2, 4, 5, 4, 4), srcs, plan))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 3, 5, 4, 4, generator=gen)
    srcs = [torch.randn(3, 6, 4, 4, generator=gen).half()]
    plan = [0, 1, 3, 0, 2, 1, 0, 1, 0, 5]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(z, s):
        masks, masked = ops.condition(z, [s], plan)
        cond = torch.empty(z.shape[0], 1 + z.shape[1], *z.shape[2:], dtype=z.dtype)
        ops.condition_cat_(cond, [s], plan)
        return masks, masked, cond

    masks, masked, cond = f(z, srcs[0])
    want = reference.condition.condition(z, srcs, plan)
    same(masks, want[0])
    same(masked, want[1])
    same(cond, torch.cat(want, 1))


def test_wrapper_backends_agree(monkeypatch):
    z = torch.randn(2, 3, 4, 2, 2).half()
    srcs = [torch.randn(3, 4, 2, 2)]
    plan = [1, 1, 3, 0, 0]
    a = ops.condition(z, srcs, plan)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    b = ops.condition(z, srcs, plan)
    for x, y in zip(a, b):
        same(x, y)


# ---- property-based: native (and the walked CUDA body) vs reference ----------------------


def _mostly(draw, lo: int, hi: int, edge: int) -> int:
    """An int in [lo, hi], ``edge`` about one time in twenty (a middle draw: hypothesis favours the bounds)."""
    v = draw(st.integers(0, 19))
    return edge if v == 10 else lo + v % (hi - lo + 1)


@st.composite
def problems(draw):
    # about 1 in 20 each: B = 0, C = 0, no sources; most samples get at least one piece
    B = _mostly(draw, 1, 3, 0)
    C = _mostly(draw, 1, 4, 0)
    T = draw(st.integers(1, 9))
    H = draw(st.integers(1, 6))
    W = draw(st.integers(1, 7))
    out_dtype = draw(st.sampled_from(DTYPES))
    n_src = _mostly(draw, 1, 4, 0)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    srcs = [
        strided_source(C, draw(st.integers(1, 10)), H, W, draw(st.sampled_from(DTYPES)), gen, draw(st.integers(0, 2)))
        for _ in range(n_src)
    ]
    plan = []
    if n_src:
        for b in range(B):
            if draw(st.integers(0, 7)) == 3:  # a sample left unconditioned
                continue
            t = draw(st.integers(0, T - 1))
            first = True
            while t < T and (first or draw(st.booleans())):
                first = False
                s = draw(st.integers(0, n_src - 1))
                Ts = srcs[s].shape[1]
                n = draw(st.integers(1, min(T - t, Ts)))
                f0 = draw(st.integers(0, Ts - n))
                plan += [b, t, n, s, f0]
                t += n + draw(st.integers(0, 2))
    rows = [plan[k : k + 5] for k in range(0, len(plan), 5)]
    order = draw(st.permutations(range(len(rows))))
    plan = [v for i in order for v in rows[i]]
    return torch.empty(B, C, T, H, W, dtype=out_dtype), srcs, plan


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(problems(), st.sampled_from([dict(), dict(max_pieces=1, max_sources=1, max_blocks=2)]))
def test_property_native_and_walk_vs_reference(problem, limits):
    z, srcs, plan = problem
    want = reference.condition.condition(z, srcs, plan)
    got = OPS.condition(z, srcs, plan)
    for g, w in zip(got, want):
        same(g, w, "native")
    B, C, T, H, W = z.shape
    cond = torch.empty(B, 1 + C, T, H, W, dtype=z.dtype)
    OPS.condition_cat_(cond, srcs, plan)
    same(cond, torch.cat(want, dim=1), "cat")
    for g, w in zip(walk(z, srcs, plan, cat=bool(len(plan) % 2), **limits), want):
        same(g, w, "walk")


# ---- CUDA ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cuda_matches_reference(out_dtype):
    B, C, T, H, W = 3, 4, 9, 24, 42

    def make(device):  # the same values and the same strides/offsets on each device
        gen = torch.Generator().manual_seed(5)
        return [strided_source(C, 10, H, W, dt, gen, k % 3, device) for k, dt in enumerate(DTYPES)]

    srcs, dsrcs = make("cpu"), make("cuda")
    assert [s.stride() for s in srcs] == [s.stride() for s in dsrcs] and dsrcs[1].storage_offset() > 0
    plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 2, 9, 2, 2, 3, 3, 4, 2, 6, 2, 1, 0]
    z = torch.empty(B, C, T, H, W, dtype=out_dtype)
    want = reference.condition.condition(z, srcs, plan)
    got = OPS.condition(z.cuda(), dsrcs, plan)
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        same(g, w, "cuda")
    cond = torch.empty(B, 1 + C, T, H, W, dtype=out_dtype, device="cuda")
    OPS.condition_cat_(cond, dsrcs, plan)
    same(cond, torch.cat(want, 1), "cuda cat")


@pytest.mark.cuda
@pytest.mark.parametrize("B", [70, 600])
def test_cuda_long_plans_match_reference(B):
    """Plans past the small launch table (> 48 pieces: the big table, one launch)
    and past the big one (> 384 pieces: several launches)."""
    C, T, H, W = 2, 3, 8, 8
    gen = torch.Generator().manual_seed(9)
    srcs = [torch.randn(C, 2, H, W, generator=gen).bfloat16() for _ in range(3)]
    plan = []
    for i in range(B):
        plan += [i, i % T, 1, i % 3, i % 2]
    z = torch.empty(B, C, T, H, W, dtype=torch.float16)
    want = reference.condition.condition(z, srcs, plan)
    got = OPS.condition(z.cuda(), [s.cuda() for s in srcs], plan)
    for g, w in zip(got, want):
        same(g, w, "cuda")


@pytest.mark.cuda
def test_cuda_inference_no_host_sync():
    from opensora_fast.utils._condition import prepare_inference_condition

    z = torch.randn(4, 16, 33, 24, 42, device="cuda", dtype=torch.bfloat16)
    refs = [[torch.randn(16, 33, 24, 42, device="cuda", dtype=torch.bfloat16)] for _ in range(4)]
    refs[2] = None
    # as the benchmark's i2v_loop with every sample referenced: two one-frame references a sample
    loop_refs = [[torch.randn(16, 1, 24, 42, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(4)]
    cases = [("v2v_head", refs), ("i2v_loop", refs), ("v2v_tail_easy", refs), ("i2v_loop", loop_refs)]
    for mode, r in cases:  # warm-up (logging, first launches)
        prepare_inference_condition(z, mode, r)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [prepare_inference_condition(z, mode, r) for mode, r in cases]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for (mode, r), (masks, masked) in zip(cases, got):
        cpu_refs = [None if x is None else [t.cpu() for t in x] for x in r]
        want = reference.upstream.condition.prepare_inference_condition(z.cpu(), mode, cpu_refs)
        same(masks, want[0])
        same(masked, want[1])


@pytest.mark.cuda
def test_cuda_device_mismatch_and_cpu_refs():
    from opensora_fast.utils._condition import prepare_inference_condition

    z = torch.randn(2, 3, 4, 5, 6, device="cuda")
    with pytest.raises(ValueError, match=r"condition: sources\[0\] is on cpu but z is on cuda:0"):
        OPS.condition(z, [torch.zeros(3, 4, 5, 6)], [0, 0, 1, 0, 0])
    refs = [[torch.randn(3, 4, 5, 6)], [torch.randn(3, 4, 5, 6)]]  # on the CPU: copied once each
    got = prepare_inference_condition(z, "i2v_loop", refs)
    want = reference.upstream.condition.prepare_inference_condition(z.cpu(), "i2v_loop", refs)
    for g, w in zip(got, want):
        assert g.device == z.device
        same(g, w)


@pytest.mark.cuda
def test_cuda_graph_capture_and_side_stream():
    B, C, T, H, W = 2, 3, 5, 4, 6
    src = [torch.randn(C, 5, H, W, device="cuda")]
    plan = [0, 0, 2, 0, 1, 1, 4, 1, 0, 0]
    cond = torch.empty(B, 1 + C, T, H, W, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # runs on the current (side) stream
        OPS.condition_cat_(cond, src, plan)
    torch.cuda.current_stream().wait_stream(side)
    z = torch.empty(B, C, T, H, W)
    same(cond, torch.cat(reference.condition.condition(z, [src[0].cpu()], plan), 1), "side stream")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS.condition_cat_(cond, src, plan)
    cond.zero_()
    src[0].mul_(2)  # the replay reads the source's current values
    graph.replay()
    torch.cuda.synchronize()
    same(cond, torch.cat(reference.condition.condition(z, [src[0].cpu()], plan), 1), "graph replay")


# ---- CPU ISA variants (baseline, AVX2, AVX-512): the same bits in every one ----------------


@needs_native
@pytest.mark.parametrize("odt", DTYPES, ids=str)
@pytest.mark.parametrize("sdt", DTYPES, ids=str)
def test_condition_same_bits_in_every_variant(odt, sdt):
    gen = torch.Generator().manual_seed(7)
    B, C, T, H, W = 2, 3, 5, 9, 11  # dense source frames: the converting loop
    z = torch.zeros(B, C, T, H, W, dtype=odt)
    src = [with_specials(C * 6 * H * W, sdt, gen).view(C, 6, H, W)]
    plan = [0, 0, 4, 0, 1, 1, 2, 3, 0, 0]
    out = each_isa(lambda: OPS.condition(z, src, plan))
    for isa, (masks, masked) in out.items():
        same(masks, out["baseline"][0], isa)
        same(masked, out["baseline"][1], isa)


# ---- many sources and edge shapes, on the CPU and CUDA --------------------------------------


def _many_sources_case(B: int = 64, C: int = 4, T: int = 5):
    """B samples x 3 references: one source per conditioned frame (3B sources)."""
    g = torch.Generator().manual_seed(12)
    dts = (torch.float32, torch.bfloat16, torch.float16)
    srcs = [torch.randn(C, 3, 6, 7, generator=g).to(dts[i % 3]) for i in range(3 * B)]
    plan = [v for b in range(B) for v in (b, 0, 1, 3 * b, 0, b, 2, 1, 3 * b + 1, 1, b, 4, 1, 3 * b + 2, 2)]
    z = torch.randn(B, C, T, 6, 7, generator=g)
    return z, srcs, plan


@pytest.mark.parametrize("device", DEVICES)
def test_condition_with_192_sources_equals_the_cpu(device):
    z, srcs, plan = _many_sources_case()
    want_m, want_z = reference.condition.condition(z, srcs, plan)
    want_cat = torch.full((64, 5, 5, 6, 7), 3.0)
    reference.condition.condition_cat_(want_cat, srcs, plan)
    if device == "cpu":
        skip_without_native()
    got_m, got_z = OPS.condition(z.to(device), [s.to(device) for s in srcs], plan)
    cat = torch.full((64, 5, 5, 6, 7), 3.0, device=device)
    OPS.condition_cat_(cat, [s.to(device) for s in srcs], plan)
    same(got_m, want_m, "masks")
    same(got_z, want_z, "masked z")
    same(cat, want_cat, "cond")
    if device == "cuda":  # and the CPU kernel, bit for bit
        cpu_m, cpu_z = OPS.condition(z, srcs, plan)
        same(got_z, cpu_z, "masked z vs CPU kernel")


@pytest.mark.parametrize("device", DEVICES)
def test_condition_cat_with_no_latent_channels(device):
    # C = 0: cond is [B, 1, T, H, W], the masks only
    skip_without_native()
    srcs = [torch.randn(0, 2, 4, 5)]
    plan = [0, 0, 1, 0, 0, 1, 1, 2, 0, 0]
    want = torch.full((2, 1, 3, 4, 5), -1.0)
    reference.condition.condition_cat_(want, srcs, plan)
    got = torch.full((2, 1, 3, 4, 5), -1.0, device=device)
    OPS.condition_cat_(got, [s.to(device) for s in srcs], plan)
    same(got, want)
    assert want[:, 0, :, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    m, masked = OPS.condition(torch.randn(2, 0, 3, 4, 5, device=device), [s.to(device) for s in srcs], plan)
    same(m, want)
    assert masked.shape == (2, 0, 3, 4, 5)
