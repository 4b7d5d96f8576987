"""The unpad_ op: one contract three ways (raw native op, reference, fake, and the
grid walk), opcheck, the CUDA body walked over its grid on the CPU, a hypothesis
differential suite (native vs reference vs grid walk), all bit-exact (a copy);
CUDA launch paths (marked `cuda`: skipped without a GPU)."""

import os

import pytest
import torch
from contract import Contract, assert_three_way, fake_call, faked, raises, raw
from helpers import assert_bitwise_equal, unpad_shards, z
from hypothesis import given
from hypothesis import strategies as st

from opensora_fast import ops, reference
from opensora_fast._ext import HAS_NATIVE
from opensora_fast.ops.unpad import unpad_lists

pytestmark = pytest.mark.skipif(
    not HAS_NATIVE and os.environ.get("OPENSORA_FAST_NO_EXT") == "1", reason="OPENSORA_FAST_NO_EXT=1 install"
)
OP = torch.ops.opensora_fast
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex128,
]


def bucketed(params, world, split=None, gen=None):
    """What a bucketed gather produces: each param zero-padded and sharded as
    model_sharding does, shards side by side in each row of [world, bucket];
    split=k cuts every shard into entries of at most k columns (a shard
    continued in the next bucket). Returns gathered and the op's lists."""
    cols, entries = [], []
    off = 0
    for i, p in enumerate(params):
        n = p.numel()
        s = -(-n // world)
        flat = torch.zeros(world * s, dtype=p.dtype)
        flat[:n] = p.reshape(-1)
        rows = flat.view(world, s)
        step = split or max(s, 1)
        for b in range(0, s, step):
            c = min(step, s - b)
            cols.append(rows[:, b : b + c])
            entries.append((i, off, s, b, c))
            off += c
        if s == 0:
            entries.append((i, off, 0, 0, 0))
    dtype = params[0].dtype if params else torch.float32
    g = torch.cat(cols, dim=1) if cols else torch.zeros(world, 0, dtype=dtype)
    idx, offset, shard, begin, count = (list(x) for x in zip(*entries)) if entries else ([], [], [], [], [])
    return g.contiguous(), idx, offset, shard, begin, count


def same_bytes(a, b, msg=""):
    """Bitwise equality for every dtype (bool, uint8, complex included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), msg


def run(fn, gathered, outs, idx, off, sh, bg, ct):
    """Calls fn once per round: round k holds the k-th piece of every split
    param, so no call writes one tensor twice (the gather never does either: a
    shard is split only at a bucket's end, so a bucket holds one piece of it)."""
    seen, rounds = {}, []
    for j, i in enumerate(idx):
        k = seen.get(i, 0)
        seen[i] = k + 1
        while len(rounds) <= k:
            rounds.append([])
        rounds[k].append(j)
    for r in rounds or [[]]:
        fn(
            gathered,
            [outs[idx[j]] for j in r],
            [off[j] for j in r],
            [sh[j] for j in r],
            [bg[j] for j in r],
            [ct[j] for j in r],
        )


def rnd(shape, dtype, g):
    x = torch.randn(shape, generator=g) * 100
    if dtype.is_complex:
        return torch.complex(x, x + 1).to(dtype)
    return x.to(dtype)


# ----------------------------------------------------------------- contract table


def _cases():
    g = z(2, 6)
    big = z(40)
    return {
        "lengths": (
            g,
            [z(3)],
            [0],
            [2, 2],
            [0],
            [2],
            ValueError,
            "unpad_: offset, shard, begin and count must each have len(out)=1 entries, got 1, 2, 1 and 1",
        ),
        "gathered 1-D": (
            z(6),
            [z(3)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: gathered must be [world, bucket], got shape [6]",
        ),
        "no rows": (
            z(0, 6),
            [z(3)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: gathered must have at least one row (world >= 1), got shape [0, 6]",
        ),
        "gathered strided": (
            z(2, 12)[:, ::2],
            [z(3)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: gathered is not contiguous",
        ),
        "dtype": (
            g,
            [z(3), z(3, dtype=torch.bfloat16)],
            [0, 2],
            [2, 2],
            [0, 0],
            [2, 2],
            TypeError,
            "unpad_: out[1] has dtype torch.bfloat16 but gathered has dtype torch.float32",
        ),
        "device": (
            g,
            [z(3), torch.zeros(3, device="meta")],
            [0, 2],
            [2, 2],
            [0, 0],
            [2, 2],
            ValueError,
            "unpad_: out[1] is on meta but gathered is on cpu (out must be on gathered's device, or in pinned host memory when gathered is on CUDA)",
        ),
        "out strided": (g, [z(2, 2).t()], [0], [2], [0], [2], ValueError, "unpad_: out[0] is not contiguous"),
        "negative": (
            g,
            [z(3)],
            [-1],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: entry 0: offset, shard, begin and count must be >= 0, got offset=-1, shard=2, begin=0, count=2",
        ),
        "past shard": (
            g,
            [z(3)],
            [0],
            [2],
            [1],
            [2],
            ValueError,
            "unpad_: entry 0: begin + count = 1 + 2 exceeds shard = 2",
        ),
        "past bucket": (
            g,
            [z(3)],
            [5],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: entry 0: offset + count = 5 + 2 exceeds the bucket's 6 columns",
        ),
        "shard too small": (
            g,
            [z(5)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: out[0] has 5 elements but world * shard = 2 * 2 covers fewer",
        ),
        "out is gathered": (
            g,
            [z(3), g[1, :3]],
            [0, 2],
            [2, 2],
            [0, 0],
            [2, 2],
            ValueError,
            "unpad_: gathered and out[1] overlap in memory; every out tensor must share no memory with gathered or another out",
        ),
        "outs overlap": (
            z(2, 6),
            [big[0:4], big[2:6]],
            [0, 2],
            [2, 2],
            [0, 0],
            [2, 2],
            ValueError,
            "unpad_: out[0] and out[1] overlap in memory",
        ),
        "requires grad": (
            g,
            [z(3), torch.zeros(3, requires_grad=True)],
            [0, 2],
            [2, 2],
            [0, 0],
            [2, 2],
            RuntimeError,
            "unpad_: out[1] requires grad and grad mode is on; unpad_ is not differentiable: call it under torch.no_grad()",
        ),
        "sparse": (
            g,
            [z(3).to_sparse()],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: out[0] must be a dense (strided) tensor",
        ),
        "gathered sparse": (
            g.to_sparse(),
            [z(3)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: gathered must be a dense (strided) tensor",
        ),
        "nested": (g, [_nested()], [0], [2], [0], [2], ValueError, "unpad_: out[0] must be a dense (strided) tensor"),
        "gathered nested": (
            _nested(),
            [z(3)],
            [0],
            [2],
            [0],
            [2],
            ValueError,
            "unpad_: gathered must be a dense (strided) tensor",
        ),
    }


def _nested():
    import warnings

    with warnings.catch_warnings():  # "nested tensors are a prototype"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([z(6), z(6)])


UNPAD_OP = Contract(
    {
        "native": raw("unpad_"),
        "walk": raw("_unpad_grid_walk"),
        "reference": reference.unpad.unpad_,
        "fake": faked(raw("unpad_")),
    }
)
# the private walk op has no autograd rule (nested tensors dispatch to one first)
NO_WALK = ("requires grad", "nested", "gathered nested")
NO_FAKE = ("nested", "gathered nested")  # FakeTensorMode (torch 2.14) cannot convert a strided nested tensor


@pytest.mark.parametrize("way", list(UNPAD_OP.ways))
@pytest.mark.parametrize("name", list(_cases()))
def test_unpad_check_contract(name, way):
    *_, exc, text = _cases()[name]
    if way == "walk" and name in NO_WALK:
        pytest.skip("the private walk op has no autograd rule (nested tensors dispatch to one first)")
    if way == "fake" and name in NO_FAKE:
        with pytest.raises(RuntimeError, match="NestedTensorImpl doesn't support sizes"):
            fake_call(raw("unpad_"), _cases()[name][:6])  # torch's own limit: fails in from_tensor, before the op
        pytest.skip("FakeTensorMode (torch 2.14) cannot convert a strided nested tensor")
    ways = [w for w in UNPAD_OP.ways if not (w == "walk" and name in NO_WALK) and not (w == "fake" and name in NO_FAKE)]
    assert_three_way(UNPAD_OP, way, lambda: _cases()[name][:6], exc, text, compare=ways)  # fresh tensors per way


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_wrapper_rejects_non_tensors(backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    raises(lambda: ops.unpad_([1.0], [z(1)], [0]), TypeError, "unpad_: gathered must be a tensor, got list")
    raises(lambda: ops.unpad_(z(1, 1), [None], [0]), TypeError, "unpad_: out[0] must be a tensor, got NoneType")


BIG = 2**63 - 1


def _overflow_cases():
    """(dtype, world, numel, shard, begin): shard/begin near 2^63 that pass every
    check. The old plan doubled them for 16-byte dtypes and the CUDA body formed
    r * shard for every row: both wrapped and wrote outside out."""
    return {
        # 16-byte: 2 * begin wraps to -8 units: 64 bytes before out
        "c128 begin": (torch.complex128, 1, 1, BIG, BIG - 3),
        # 16-byte: 2 * shard wraps, row 1 lands 128 bytes after out (the CPU kernel too)
        "c128 shard": (torch.complex128, 2, 4, 2**62 + 8, 0),
        # world 3: 2 * shard wraps to -2, row 2 lands 2 elements before out (CUDA body)
        "f32 row 2": (torch.float32, 3, 2, BIG, 0),
        "u8 row 2 begin": (torch.uint8, 3, 3, BIG, 1),
    }


@pytest.mark.parametrize("case", list(_overflow_cases()))
@pytest.mark.parametrize("way", ["native", "walk", "walk small", "reference"])
def test_huge_shard_and_begin_stay_inside_out(case, way):
    """Only row 0 (from begin on) lands in out; nothing outside out is written.
    out sits in the middle of a guard buffer that must stay untouched."""
    dtype, world, numel, shard, begin = _overflow_cases()[case]
    gen = torch.Generator().manual_seed(7)
    gathered = (
        rnd((world, 4), dtype, gen)
        if dtype.is_complex or dtype.is_floating_point
        else torch.randint(1, 200, (world, 4), generator=gen).to(dtype)
    )
    guard = torch.zeros(numel + 16, dtype=dtype)
    out = guard[8 : 8 + numel]
    fn = {
        "native": OP.unpad_,
        "walk": OP._unpad_grid_walk,
        "walk small": lambda *a: OP._unpad_grid_walk(*a, 0, 0, True),
        "reference": reference.unpad.unpad_,
    }[way]
    fn(gathered, [out], [1], [shard], [begin], [3])
    want = torch.zeros(numel + 16, dtype=dtype)
    k = min(3, numel - begin) if begin < numel else 0
    want[8 + begin : 8 + begin + k] = gathered[0, 1 : 1 + k]
    same_bytes(guard, want, f"{case} {way}")


def test_huge_values_through_the_wrapper_defaults_and_lists():
    """The same calls through ops.unpad_ (the op path users take)."""
    for case, (dtype, world, numel, shard, begin) in _overflow_cases().items():
        gathered = torch.ones(world, 4, dtype=dtype)
        guard = torch.zeros(numel + 16, dtype=dtype)
        ops.unpad_(gathered, [guard[8 : 8 + numel]], [0], [shard], [begin], [1])
        assert guard[:8].eq(0).all() and guard[8 + numel :].eq(0).all(), case


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    "arg,value", [("offset", 2**63), ("shard", 2**64 + 3), ("begin", -(2**63) - 1), ("count", 2**100)]
)
def test_values_outside_int64_are_a_value_error(backend, arg, value, monkeypatch):
    """Natively the schema parser refused these with its own RuntimeError; both
    backends now say the same ValueError, before any write."""
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    g = torch.ones(2, 6)
    lists = dict(offset=[0, 0], shard=[3, 3], begin=[0, 0], count=[3, 3])
    lists[arg] = [lists[arg][0], value]
    out = [torch.zeros(5), torch.zeros(5)]
    text = f"unpad_: {arg}[1] = {value} does not fit in int64"
    raises(lambda: ops.unpad_(g, out, **lists), ValueError, text)
    raises(
        lambda: unpad_lists(g, out, lists["offset"], lists["shard"], lists["begin"], lists["count"]), ValueError, text
    )
    raises(
        lambda: reference.unpad.unpad_(g, out, lists["offset"], lists["shard"], lists["begin"], lists["count"]),
        ValueError,
        text,
    )
    assert not any(o.any() for o in out)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_wrapper_refuses_nested_and_sparse_alike(backend, monkeypatch):
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", backend)
    raises(lambda: ops.unpad_(_nested(), [z(3)], [0]), ValueError, "unpad_: gathered must be a dense (strided) tensor")
    raises(
        lambda: ops.unpad_(z(2, 6).to_sparse(), [z(3)], [0]),
        ValueError,
        "unpad_: gathered must be a dense (strided) tensor",
    )
    raises(lambda: ops.unpad_(z(2, 6), [_nested()], [0]), ValueError, "unpad_: out[0] must be a dense (strided) tensor")


def test_version_bumped_and_no_grad_ok():
    g, idx, off, sh, bg, ct = bucketed([torch.arange(5.0)], 2)
    out = torch.zeros(5)
    x = torch.randn(5, requires_grad=True)
    y = (x * out).sum()
    v = out._version
    OP.unpad_(g, [out], off, sh, bg, ct)
    assert out._version > v and torch.equal(out, torch.arange(5.0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    w = torch.zeros(5, requires_grad=True)
    with torch.no_grad():
        OP.unpad_(g, [w], off, sh, bg, ct)
    assert torch.equal(w.detach(), torch.arange(5.0))


# ----------------------------------------------------------------- results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_all_backends_restore_the_params(dtype, world):
    g = torch.Generator().manual_seed(world)
    params = [rnd(s, dtype, g) for s in [(5, 3), (), (1,), (2,), (0,), (33, 17), (world + 1,)]]
    for split in (None, 1, 3):
        gathered, idx, off, sh, bg, ct = bucketed(params, world, split)
        for name, fn in [
            ("native", OP.unpad_),
            ("walk", OP._unpad_grid_walk),
            ("walk small tables", lambda *a: OP._unpad_grid_walk(*a, 2, 3, True)),
            ("reference", reference.unpad.unpad_),
        ]:
            # a split param gets one entry per piece, all writing into one tensor
            outs = [torch.full_like(p, 7) for p in params]
            run(fn, gathered, outs, idx, off, sh, bg, ct)
            for i, (o, p) in enumerate(zip(outs, params)):
                same_bytes(o, p, f"{name} param {i} split={split}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_walk_every_alignment(dtype):
    """The CUDA body moves 16 bytes at a time once the destination is 16-byte
    aligned (one element at a time before that and in the tail), with 16-byte
    loads when the source is co-aligned and element loads otherwise: every
    destination and source offset within 16 bytes, rows long and short."""
    g = torch.Generator().manual_seed(3)
    params = [rnd((67,), dtype, g), rnd((3, 7), dtype, g), rnd((5,), dtype, g)]
    gathered, idx, off, sh, bg, ct = bucketed(params, 2)
    per16 = max(16 // torch.empty((), dtype=dtype).element_size(), 1)
    for so in range(per16 + 1):
        src = torch.zeros(so + gathered.numel(), dtype=dtype)[so:].view_as(gathered)
        src.copy_(gathered)
        for do in range(per16 + 1):
            buf = torch.zeros(do + sum(p.numel() for p in params), dtype=dtype)
            outs, pos = [], do
            for p in params:
                outs.append(buf[pos : pos + p.numel()].view(p.shape))
                pos += p.numel()
            OP._unpad_grid_walk(src, outs, off, sh, bg, ct)
            for o, p in zip(outs, params):
                same_bytes(o, p, f"src offset {so} dst offset {do}")


def test_wrapper_defaults_are_model_sharding():
    params = [torch.randn(5, 3), torch.randn(()), torch.randn(2)]
    gathered, idx, off, sh, bg, ct = bucketed(params, 3)
    outs = [torch.empty_like(p) for p in params]
    ops.unpad_(gathered, outs, off)
    for o, p in zip(outs, params):
        assert_bitwise_equal(o, p)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    params = [rnd((5, 3), torch.float32, g), rnd((), torch.float32, g), rnd((9,), torch.float32, g)]
    gathered, idx, off, sh, bg, ct = bucketed(params, 3, split=2)
    first = [j for j in range(len(idx)) if idx.index(idx[j]) == j]  # the first piece of each param
    outs = [torch.empty_like(p) for p in params]
    pick = lambda xs: [xs[j] for j in first]  # noqa: E731
    torch.library.opcheck(OP.unpad_, (gathered, outs, pick(off), pick(sh), pick(bg), pick(ct)))
    gathered, idx, off, sh, bg, ct = bucketed(params, 3)
    torch.library.opcheck(OP.unpad_, (gathered, [torch.empty_like(p) for p in params], off, sh, bg, ct))


def test_fake_and_meta():
    params = [torch.randn(4, 2), torch.randn(3)]
    gathered, idx, off, sh, bg, ct = bucketed(params, 2)
    outs = [torch.empty_like(p) for p in params]
    fake_call(raw("unpad_"), (gathered, outs, off, sh, bg, ct))  # fine: returns None
    meta = (gathered.to("meta"), [o.to("meta") for o in outs])
    OP.unpad_(*meta, off, sh, bg, ct)  # meta tensors: the checks, nothing else
    with pytest.raises(ValueError, match=r"unpad_: out\[0\] has 8 elements but world \* shard = 2 \* 3 covers fewer"):
        OP.unpad_(*meta, off, [3, 2], bg, [3, 2])


def test_launch_plan_splits_tables_by_entries_and_blocks():
    # 40 entries > the small table's 32; a param over 16384*world elements spans chunks
    g = torch.Generator().manual_seed(1)
    params = [rnd((n,), torch.bfloat16, g) for n in [3] * 39 + [70001]]
    gathered, idx, off, sh, bg, ct = bucketed(params, 3)
    for limits in [(0, 0, True), (5, 2, False), (1, 1, True), (0, 0, False)]:
        outs = [torch.zeros_like(p) for p in params]
        OP._unpad_grid_walk(gathered, outs, off, sh, bg, ct, *limits)
        for o, p in zip(outs, params):
            assert_bitwise_equal(o, p, str(limits))


# ----------------------------------------------------------------- hypothesis


@st.composite
def calls(draw):
    world = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    k = draw(st.integers(0, 6))
    sizes = [
        draw(st.sampled_from([(), (0,), (1,), (2,), (3,), (7,), (4, 5), (world * 3 + 1,), (255,)])) for _ in range(k)
    ]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    params = [rnd(s, dtype, g) for s in sizes]
    split = draw(st.sampled_from([None, 1, 2, 5]))
    gathered, idx, off, sh, bg, ct = (
        bucketed(params, world, split) if params else (torch.zeros(world, 0, dtype=dtype), [], [], [], [], [])
    )
    corrupt = bool(params) and draw(st.integers(0, 5)) == 0
    if corrupt:  # corrupt one entry: every backend refuses it alike (or copies the same wrong columns)
        j = draw(st.integers(0, len(idx) - 1))
        which = draw(st.sampled_from(["off", "ct", "sh"]))
        {"off": off, "ct": ct, "sh": sh}[which][j] += draw(st.integers(1, 40))
    # storage offset: gathered at a random place inside a bigger buffer
    pad = draw(st.integers(0, 5))
    buf = torch.zeros(gathered.numel() + pad, dtype=dtype)
    buf[pad:] = gathered.reshape(-1)
    gathered = buf[pad:].view(gathered.shape)
    return params, gathered, idx, off, sh, bg, ct, corrupt


def _outcome(fn, params, idx, *args):
    outs = [torch.zeros_like(p) for p in params]
    try:
        run(fn, args[0], outs, idx, *args[1:])
        return outs, None
    except Exception as e:  # noqa: BLE001
        return outs, (type(e), str(e).splitlines()[0])


@given(calls())
def test_native_walk_reference_agree(call):
    params, gathered, idx, off, sh, bg, ct, corrupt = call
    results = [
        _outcome(f, params, idx, gathered, off, sh, bg, ct)
        for f in (OP.unpad_, OP._unpad_grid_walk, reference.unpad.unpad_)
    ]
    (o0, e0) = results[0]
    for o, e in results[1:]:
        assert e == e0
        for a, b in zip(o, o0):
            same_bytes(a, b)
    if not corrupt:
        assert e0 is None, e0
        for a, p in zip(o0, params):
            same_bytes(a, p)


# ---- CUDA (marked `cuda`: skipped without a GPU; benchmarks/gpu_check.sh runs them) ----


def _unpad_case(world, sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [rnd(s, dtype, g) for s in sizes]
    return params, bucketed(params, world)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.complex128])
def test_unpad_cuda_equals_cpu_into_device_and_pinned(dtype):
    # > 256 entries (several tables), one entry over 3072 chunks, 0-dim, smaller than the world
    big = 3072 * 16384 + 11 if dtype == torch.bfloat16 else 70001  # > one table of chunks (bf16 only: memory)
    sizes = [(), (1,), (2,), (5, 3), (big,)] + [(64 + i,) for i in range(300)]
    params, (gathered, idx, off, sh, bg, ct) = _unpad_case(3, sizes, dtype, 4)
    want = [torch.zeros_like(p) for p in params]
    OP.unpad_(gathered, want, off, sh, bg, ct)
    dev = [torch.zeros_like(p, device="cuda") for p in params]
    OP.unpad_(gathered.cuda(), dev, off, sh, bg, ct)
    pinned = [torch.zeros_like(p).pin_memory() for p in params]
    OP.unpad_(gathered.cuda(), pinned, off, sh, bg, ct)  # the kernel writes host memory directly
    torch.cuda.synchronize()
    for i, (w, d, h, p) in enumerate(zip(want, dev, pinned, params)):
        assert torch.equal(w.view(-1).view(torch.uint8), p.view(-1).view(torch.uint8)), i
        assert torch.equal(d.cpu().view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), i
        assert torch.equal(h.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), i


@pytest.mark.cuda
def test_unpad_cuda_refuses_unpinned_host_and_does_not_sync():
    params, (gathered, idx, off, sh, bg, ct) = _unpad_case(2, [(7,), (3, 3)], torch.float32, 5)
    g = gathered.cuda()
    with pytest.raises(ValueError, match=r"out\[0\] is on cpu but gathered is on cuda:0"):
        OP.unpad_(g, [torch.zeros(7), torch.zeros(3, 3, device="cuda")], off, sh, bg, ct)
    outs = [torch.zeros_like(p, device="cuda") for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            OP.unpad_(g, outs, off, sh, bg, ct)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for o, p in zip(outs, params):
        assert torch.equal(o.cpu(), p)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["separate", "flat", "flat_reversed"])
@pytest.mark.parametrize("staging", [False, True, None])
def test_model_gathering_nccl_into_pinned(staging, layout):
    """The gather (utils.ckpt.model_gathering) that unpad_ serves. 1 rank on NCCL: the bucketed gather into pinned host memory, with the kernel
    writing it directly or through the device staging buffer and the copy engine;
    into separate pinned tensors or into views of pinned segments (CheckpointIO's,
    where staging is the default), also laid out in reverse (nothing to merge)."""
    import torch.distributed as dist

    from opensora_fast.utils import ckpt

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(11)
        ema = torch.nn.Module()
        shapes = [(5, 3), (), (1,), (4097,), (33, 17), (300, 301)]
        for i, s in enumerate(shapes):
            ema.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g).bfloat16().cuda()))
        orig = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
        shape_dict = ckpt.record_model_param_shape(ema)
        ckpt.model_sharding(ema)
        if layout == "separate":
            pinned = {k: torch.full(v, -7.0, dtype=torch.bfloat16, pin_memory=True) for k, v in shape_dict.items()}
        else:
            entries = [(k, v, torch.bfloat16) for k, v in shape_dict.items()]
            pinned = ckpt.CheckpointIO._pinned_dict(entries if layout == "flat" else entries[::-1])
            for v in pinned.values():
                assert v.is_pinned()
                v.fill_(-7.0)
        # a small bucket: parameters split across buckets go direct, whole ones are staged
        ckpt.model_gathering(ema, shape_dict, pinned, bucket_bytes=4096, staging=staging, progress=False)
        for k, v in orig.items():
            assert_bitwise_equal(pinned[k], v, f"{k} staging={staging} {layout}")
        # extra device memory: at most two buckets (staged: one gathered and two
        # staging buffers of 2/3 of a bucket each), plus the allocator's 512-byte
        # rounding of each buffer and the small flag tensors
        bucket = 64 << 10
        for v in pinned.values():
            v.fill_(-7.0)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ckpt.model_gathering(ema, shape_dict, pinned, bucket_bytes=bucket, staging=staging, progress=False)
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= 2 * bucket + 4096, (extra, staging, layout)
        for k, v in orig.items():
            assert_bitwise_equal(pinned[k], v, f"{k} staging={staging} {layout} bucket={bucket}")
    finally:
        dist.destroy_process_group()


# ---- CUDA: past 2^31 elements ---------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.slow
def test_unpad_over_2_pow_31_uint8_elements():
    shard = 2**30 + 8
    numel = 2 * shard - 3  # 2^31 + 13; the last 3 columns of row 1 are padding
    need = 4 * numel + (1 << 30)  # gathered, out, the compare's bool and headroom
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(
            f"not enough GPU memory for unpad_ past 2^31: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
        )
    gathered = torch.zeros(2, shard, dtype=torch.uint8, device="cuda")
    u8 = lambda *v: torch.tensor(v, dtype=torch.uint8, device="cuda")  # noqa: E731
    gathered[0, :3] = u8(7, 8, 9)
    gathered[1, shard - 8 : shard - 3] = u8(1, 2, 3, 4, 5)  # the last valid elements
    gathered[1, shard - 3 :] = 99  # padding: never written
    c0 = 2**31 - shard  # row 1's column holding element 2^31
    gathered[1, c0 - 2 : c0 + 4] = u8(11, 12, 13, 14, 15, 16)
    out = torch.full((numel,), 200, dtype=torch.uint8, device="cuda")
    OP.unpad_(gathered, [out], [0], [shard], [0], [shard])
    del gathered
    assert int((out == 200).sum()) == 0  # every element written
    assert int((out == 99).sum()) == 0
    assert int(out.count_nonzero()) == 3 + 5 + 6
    assert out[:3].tolist() == [7, 8, 9]
    assert out[-5:].tolist() == [1, 2, 3, 4, 5]
    assert out[2**31 - 2 : 2**31 + 4].tolist() == [11, 12, 13, 14, 15, 16]


# ---- CUDA: pinned and registered destinations ----------------------------------------------


@pytest.mark.cuda
def test_unpad_pinned_destination_is_held_by_the_allocator_until_the_stream_is_done():
    # As copy_(non_blocking=True): a pinned destination freed before the kernel
    # ran must not be handed to the next pinned allocation.
    n = 1 << 20
    gathered = torch.randn(1, n, device="cuda")
    out = torch.zeros(n).pin_memory()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # holds the stream ~0.5 s: the kernel is still queued below
    OP.unpad_(gathered, [out], [0], [n], [0], [n])
    ptr = out.data_ptr()
    del out
    again = torch.empty(n).pin_memory()
    assert again.data_ptr() != ptr, "the pinned block was reused while the kernel could still write it"
    torch.cuda.synchronize()


def _register(t: torch.Tensor) -> None:
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    assert int(rc) == 0, rc


@pytest.mark.cuda
@pytest.mark.parametrize("force", [False, True], ids=["as-the-device-says", "device-pointers-forced"])
def test_unpad_into_registered_and_allocated_pinned_memory(force):
    # cudaHostRegister memory (torch's pinned_use_cuda_host_register, or a user's
    # own) is addressed through its device pointer where the device cannot use
    # the host one; forcing that lookup exercises the path on any GPU.
    g = torch.Generator().manual_seed(5)
    shapes = [(), (1,), (5, 3), (40001,)] + [(17,)] * 40
    gathered, off, sh, bg, ct = unpad_shards(3, shapes, torch.float32, g)
    want = [torch.zeros(s) for s in shapes]
    OP.unpad_(gathered, want, off, sh, bg, ct)
    numels = [torch.Size(s).numel() for s in shapes]
    buf = torch.full((sum(numels) + 1,), -1.0)  # plain host memory, then registered
    _register(buf)
    prev = OP._force_device_pointers(force)
    try:
        assert buf.is_pinned()
        starts = [1 + sum(numels[:i]) for i in range(len(numels))]  # a 4-byte offset: views inside the range
        registered = [buf[s : s + n].view(shape) for s, n, shape in zip(starts, numels, shapes)]
        allocated = [torch.full(s, -1.0).pin_memory() for s in shapes]
        dev = gathered.cuda()
        OP.unpad_(dev, registered, off, sh, bg, ct)
        OP.unpad_(dev, allocated, off, sh, bg, ct)
        torch.cuda.synchronize()
        for i, (w, a, b) in enumerate(zip(want, registered, allocated)):
            assert_bitwise_equal(a, w, f"registered out[{i}]")
            assert_bitwise_equal(b, w, f"pinned out[{i}]")
        assert float(buf[0]) == -1.0  # nothing before the first destination
    finally:
        OP._force_device_pointers(prev)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


# ---- CUDA: graph capture and side streams --------------------------------------------------


@pytest.mark.cuda
def test_unpad_graph_capture_replays_and_side_stream_without_sync():
    g = torch.Generator().manual_seed(8)
    shapes = [(), (2,), (5, 3), (3 * 32768 + 7,)] + [(9,)] * 300  # several tables
    gathered, off, sh, bg, ct = unpad_shards(4, shapes, torch.bfloat16, g)
    dev = gathered.cuda()
    outs = [torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OP.unpad_(dev, outs, off, sh, bg, ct)
    for _ in range(2):  # new contents of the captured buffer each replay
        fresh = (torch.randn(gathered.shape, generator=g) * 50).to(torch.bfloat16)
        dev.copy_(fresh)
        graph.replay()
        want = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
        OP.unpad_(fresh, want, off, sh, bg, ct)
        torch.cuda.synchronize()
        for i, (o, w) in enumerate(zip(outs, want)):
            assert_bitwise_equal(o, w, f"replay out[{i}]")
    # a side stream, into device and pinned memory, no host sync
    dev_out = [torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    pinned = [torch.zeros(s, dtype=torch.bfloat16).pin_memory() for s in shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            OP.unpad_(dev, dev_out, off, sh, bg, ct)
            OP.unpad_(dev, pinned, off, sh, bg, ct)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    want = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    OP.unpad_(dev.cpu(), want, off, sh, bg, ct)
    for i, (a, b, w) in enumerate(zip(dev_out, pinned, want)):
        assert_bitwise_equal(a, w, f"side stream out[{i}]")
        assert_bitwise_equal(b, w, f"side stream pinned out[{i}]")
