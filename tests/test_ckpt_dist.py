"""The bucketed gathers on gloo, world sizes 1 to 4 (one spawn per world size,
every case inside it): sharding then gathering returns the original exactly
and equals the upstream-faithful reference; master weights over two process
groups; bad input raises on every rank (no rank left in a collective, nothing
written); CheckpointIO save -> load round trip, bit-exact."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_bitwise_equal

from opensora_fast.reference.upstream import ckpt as ref
from opensora_fast.utils import _ckpt_gather, _ckpt_io, ckpt

# (name, shape, dtype): smaller than the world, 0-dim, odd, bf16 and fp32
SHAPES = [
    ("a.w", (5, 3), torch.float32),
    ("a.scalar", (), torch.float32),
    ("a.one", (1,), torch.bfloat16),
    ("a.two", (2,), torch.float32),
    ("b.w", (33, 17), torch.bfloat16),
    ("b.b", (7,), torch.bfloat16),
    ("c.big", (257,), torch.float32),
]


class Net(torch.nn.Module):
    def __init__(self, shapes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = [n for n, _, _ in shapes]
        for n, s, dt in shapes:
            self.register_parameter(n.replace(".", "_"), torch.nn.Parameter((torch.randn(s, generator=g) * 3).to(dt)))
        self.register_buffer("stat", torch.randn(3, generator=g))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))


def _pinned_for(shape_dict, net):
    sd = {k: torch.empty(shape_dict[k], dtype=p.dtype) for k, p in net.named_parameters()}
    for k, v in net.state_dict().items():
        sd.setdefault(k, torch.empty(v.shape, dtype=v.dtype))
    return sd


class FakeZero:
    """What master_weights_gathering needs of ColossalAI's LowLevelZeroOptimizer."""

    def __init__(self, model, group_of):
        self.w2m, self.param_to_pg = {}, {}
        for n, p in model.named_parameters():
            pg = group_of(n)
            w, r = dist.get_world_size(pg), dist.get_rank(pg)
            flat = p.detach().float().reshape(-1) * 1.5 + 0.25  # distinct from the working copy
            flat = torch.nn.functional.pad(flat, [0, (w - flat.numel() % w) % w])
            s = flat.numel() // w
            self.w2m[id(p)] = flat[r * s : (r + 1) * s].clone()
            self.param_to_pg[p] = pg

    def get_working_to_master_map(self):
        return self.w2m

    def state_dict(self):  # the master weights are the point here
        return {}

    def load_state_dict(self, sd):
        assert sd == {}


def _expect_error(fn, rank, rank0_exc, rank0_text):
    with pytest.raises(Exception) as info:
        fn()
    if rank == 0:
        assert type(info.value) is rank0_exc and rank0_text in str(info.value), repr(info.value)
    else:  # the other ranks are released with a pointer to rank 0's error
        assert "another rank refused the call" in str(info.value) or rank0_text in str(info.value), repr(info.value)


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)  # forked: no inherited thread pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    try:
        _cases(rank, world, tmp)
    finally:
        dist.destroy_process_group()


def _cases(rank, world, tmp):
    full = Net(SHAPES)
    orig = {k: v.detach().clone() for k, v in full.state_dict().items()}
    ema = Net(SHAPES)
    shapes = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    for k, p in ema.named_parameters():
        assert p.dim() == 1 and p.numel() == -(-orig[k].numel() // world)
    # the same shards as upstream's, bit for bit (padding zero), laid side by
    # side in one buffer per dtype, in parameter order
    theirs_net = Net(SHAPES)
    ref.model_sharding(theirs_net)
    for (k, p), q in zip(ema.named_parameters(), theirs_net.parameters()):
        assert_bitwise_equal(p.data, q.data, k)
    for dt in (torch.float32, torch.bfloat16):
        same = [p.data for p in ema.parameters() if p.dtype == dt]
        assert ckpt._side_by_side(same) and same[0].storage_offset() == 0, dt
        # the buffer holds the shards only: the full parameters are not kept alive
        assert same[0].untyped_storage().nbytes() == sum(t.numel() for t in same) * same[0].element_size(), dt
    assert not ckpt._side_by_side([q.data for q in theirs_net.parameters() if q.dtype == torch.float32])

    # gathers: every bucket size from one element per rank to one bucket for all,
    # both collectives; rank 0 gets the originals bit for bit
    # (one element per rank per bucket: only on the small parameters, it is a
    # collective per element)
    small = Net(SHAPES[:4], seed=1)
    small_orig = {k: v.detach().clone() for k, v in small.state_dict().items()}
    small_shapes = ckpt.record_model_param_shape(small)
    ckpt.model_sharding(small)
    pinned = _pinned_for(small_shapes, small) if rank == 0 else None
    ckpt.model_gathering(small, small_shapes, pinned, bucket_bytes=world * 4)
    if rank == 0:
        for k, v in small_orig.items():
            assert_bitwise_equal(pinned[k], v, k)
    # staging=True: whole parameters go through the staging buffer, parameters
    # split across buckets (b.w at 40 bytes per rank) are still written directly
    for bucket_bytes, collective, staging in (
        (40 * world, "gather", False),
        (40 * world, "gather", True),
        (1000, "all_gather", False),
        (1000, "all_gather", True),
        (1000, "gather", False),
        (None, "auto", False),
        (None, "auto", True),
    ):
        pinned = _pinned_for(shapes, ema) if rank == 0 else None
        if rank == 0:
            for v in pinned.values():
                v.fill_(-99)
        ckpt.model_gathering(ema, shapes, pinned, bucket_bytes=bucket_bytes, collective=collective, staging=staging)
        if rank == 0:
            for k, v in orig.items():
                assert_bitwise_equal(pinned[k], v, f"{k} bucket_bytes={bucket_bytes} {collective} staging={staging}")

    # shards that are not side by side (upstream's sharding: each bucket is
    # packed into the send buffer), and destinations in one flat buffer as
    # CheckpointIO makes them (staging=True copies each run of adjacent
    # destinations at once; parameters split across buckets go direct)
    up_net = Net(SHAPES)
    ref.model_sharding(up_net)
    for bucket_bytes, staging in ((40 * world, None), (40 * world, True), (1000, True), (None, True), (None, False)):
        # reversed: one storage, but each destination lies before the previous one;
        # segmented: CheckpointIO's buffers split into 64-byte segments (runs end there)
        for net, order, segment in ((up_net, 1, None), (ema, 1, None), (ema, -1, None), (ema, 1, 64)):
            entries = [(k, v.shape, v.dtype) for k, v in _pinned_for(shapes, net).items()][::order]
            full_segment, _ckpt_io.PIN_SEGMENT_BYTES = _ckpt_io.PIN_SEGMENT_BYTES, segment or _ckpt_io.PIN_SEGMENT_BYTES
            try:
                flat = ckpt.CheckpointIO._pinned_dict(entries)
            finally:
                _ckpt_io.PIN_SEGMENT_BYTES = full_segment
            if rank == 0:
                fp32 = [flat[k] for k in shapes if flat[k].dtype == torch.float32]
                assert ckpt._side_by_side(fp32 if order == 1 else fp32[::-1]) == (segment is None)
                for v in flat.values():
                    v.fill_(-99)
            ckpt.model_gathering(net, shapes, flat if rank == 0 else None, bucket_bytes=bucket_bytes, staging=staging)
            if rank == 0:
                for k, v in orig.items():
                    assert_bitwise_equal(
                        flat[k], v, f"{k} bucket_bytes={bucket_bytes} staging={staging} order={order} segment={segment}"
                    )

    # extra memory within two buckets, every buffer counted, on every rank:
    # packed (upstream-sharded) or side-by-side shards, staged or not
    class Recorder:
        def __init__(self):
            self.nbytes = 0

        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *args, **kwargs):
            t = torch.empty(*args, **kwargs)
            self.nbytes += t.numel() * t.element_size()
            return t

    for net in (up_net, ema):
        for staging in (None, True, False):
            for bucket_bytes in (200, 1000):
                entries = [(k, v.shape, v.dtype) for k, v in _pinned_for(shapes, net).items()]
                flat = ckpt.CheckpointIO._pinned_dict(entries)
                rec = Recorder()
                _ckpt_gather.torch = rec  # where the gather makes its buffers
                try:
                    ckpt.model_gathering(
                        net, shapes, flat if rank == 0 else None, bucket_bytes=bucket_bytes, staging=staging
                    )
                finally:
                    _ckpt_gather.torch = torch
                # per dtype group (fp32 and bf16 run one after the other)
                # world 1: no collective, no bucket, nothing allocated
                assert rank != 0 or (rec.nbytes > 0) == (world > 1)
                assert rec.nbytes <= 2 * 2 * bucket_bytes, (rec.nbytes, bucket_bytes, staging, world, rank)
                if rank == 0:
                    for k, v in orig.items():
                        assert_bitwise_equal(flat[k], v, f"{k} bucket_bytes={bucket_bytes} staging={staging}")

    # equals the upstream-faithful port (which cannot take 0-dim parameters)
    no0 = [s for s in SHAPES if s[1] != ()]
    ema2 = Net(no0, seed=3)
    shapes2 = ckpt.record_model_param_shape(ema2)
    ckpt.model_sharding(ema2)
    mine = _pinned_for(shapes2, ema2) if rank == 0 else None
    theirs = _pinned_for(shapes2, ema2) if rank == 0 else None
    ckpt.model_gathering(ema2, shapes2, mine, bucket_bytes=64)
    ref.model_gathering(ema2, shapes2, theirs)
    if rank == 0:
        for k in mine:
            assert_bitwise_equal(mine[k], theirs[k], k)
    with pytest.raises(TypeError):  # why the reference skips 0-dim: upstream fails there
        ref.remove_padding(torch.zeros(4), ())

    # master weights over two process groups: the world, and halves of it
    halves = [list(range(0, (world + 1) // 2)), list(range((world + 1) // 2, world))]
    groups = [dist.new_group(h) if h else None for h in halves]
    mine_half = groups[0] if rank in halves[0] else groups[1]
    for shape_list in (SHAPES, no0):
        model = Net(shape_list, seed=5)
        opt = FakeZero(model, lambda n: dist.group.WORLD if n.startswith("a") else mine_half)
        pinned = {n: torch.full(p.shape, -1.0) for n, p in model.named_parameters()} if rank == 0 else None
        ckpt.master_weights_gathering(model, opt, pinned, bucket_bytes=48, staging=shape_list is no0)
        if rank == 0:
            for n, p in model.named_parameters():
                assert_bitwise_equal(pinned[n], (p.detach().float() * 1.5 + 0.25), n)
        if shape_list is no0:
            theirs = {n: torch.full(p.shape, -2.0) for n, p in model.named_parameters()} if rank == 0 else None
            ref.master_weights_gathering(model, opt, theirs)
            if rank == 0:
                for n in pinned:
                    assert_bitwise_equal(pinned[n], theirs[n], n)

    # bad input: every rank raises, rank 0 names the thing, nothing written
    bad_shapes = dict(shapes)
    bad_shapes["b_w"] = torch.Size([40, 17])
    _expect_error(
        lambda: ckpt.model_gathering(ema, bad_shapes, _pinned_for(shapes, ema) if rank == 0 else None),
        0,
        ValueError,
        "'b_w' has a local shard",
    )  # every rank sees its own shard mismatch
    pinned = _pinned_for(shapes, ema) if rank == 0 else None
    if rank == 0:
        del pinned["b_b"]
        for v in pinned.values():
            v.zero_()
    _expect_error(lambda: ckpt.model_gathering(ema, shapes, pinned), rank, ValueError, "no entry 'b_b'")
    if rank == 0:
        assert all(bool((v == 0).all()) for v in pinned.values()), "written before the error"
    pinned = _pinned_for(shapes, ema) if rank == 0 else None
    if rank == 0:
        pinned["a_w"] = torch.empty(5, 3, dtype=torch.float64)
    _expect_error(
        lambda: ckpt.model_gathering(ema, shapes, pinned), rank, ValueError, "['a_w'] has dtype torch.float64"
    )
    if rank == 0:
        pinned["a_w"] = torch.empty(3, 5)
    _expect_error(lambda: ckpt.model_gathering(ema, shapes, pinned), rank, ValueError, "['a_w'] has shape [3, 5]")
    if rank == 0:
        good = _pinned_for(shapes, ema)["a_w"]
        pinned["a_w"] = torch.empty(*good.shape, 2, dtype=good.dtype)[..., 0]  # right shape and dtype, strided
    _expect_error(lambda: ckpt.model_gathering(ema, shapes, pinned), rank, ValueError, "['a_w'] is not contiguous")
    if rank == 0:
        pinned["a_w"] = [0.0]
    _expect_error(
        lambda: ckpt.model_gathering(ema, shapes, pinned), rank, ValueError, "['a_w'] is a list, not a tensor"
    )
    _expect_error(
        lambda: ckpt.model_gathering(ema, shapes, _pinned_for(shapes, ema), bucket_bytes=world * 2 - 1),
        0,
        ValueError,
        "holds less than one",
    )
    _expect_error(
        lambda: ckpt.model_gathering(ema, shapes, _pinned_for(shapes, ema), staging="yes"),
        0,
        TypeError,
        "staging must be None or a bool",
    )

    # CheckpointIO round trip: EMA (sharded), master weights, plain model and
    # optimizer, without colossalai; then the loaded EMA re-sharded equals the live one
    model = Net(SHAPES, seed=9)
    opt_model = Net([s for s in SHAPES if s[2] == torch.float32], seed=10)
    adam = torch.optim.AdamW(opt_model.parameters(), lr=0.1)
    opt_model.a_w.grad = torch.ones(5, 3)
    adam.step()
    zero = FakeZero(model, lambda n: dist.group.WORLD)
    io = ckpt.CheckpointIO(bucket_bytes=256)
    out = io.save(
        None,
        tmp,
        model=opt_model,
        ema=ema,
        optimizer=adam,
        epoch=1,
        step=5,
        global_step=9,
        actual_update_step=9,
        ema_shape_dict=shapes,
        async_io=True,
    )
    io._sync_io()
    dist.barrier()
    assert os.path.basename(out) == "epoch1-global_step9" and os.path.isfile(os.path.join(out, "running_states.json"))
    ema_back = Net(SHAPES, seed=77)
    m_back = Net([s for s in SHAPES if s[2] == torch.float32], seed=78)
    a_back = torch.optim.AdamW(m_back.parameters(), lr=0.5)
    assert io.load(None, out, model=m_back, ema=ema_back, optimizer=a_back, strict=True) == (1, 5)
    for k, v in orig.items():
        assert_bitwise_equal(ema_back.state_dict()[k], v, k)
    for k, v in opt_model.state_dict().items():
        assert_bitwise_equal(m_back.state_dict()[k], v, k)
    assert a_back.state_dict()["param_groups"][0]["lr"] == 0.1
    assert_bitwise_equal(a_back.state_dict()["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])

    # master weights through save/load (one ZeRO group, the world)
    io2 = ckpt.CheckpointIO()
    out2 = io2.save(
        None,
        tmp,
        model=model,
        optimizer=zero,
        epoch=1,
        step=6,
        global_step=10,
        actual_update_step=10,
        async_io=False,
        include_master_weights=True,
    )
    want = {k: v.clone() for k, v in zero.w2m.items()}
    for v in zero.w2m.values():
        v.fill_(123.0)
    io2.load(None, out2, optimizer=zero)
    master = ckpt._load_safetensors(os.path.join(out2, "master.safetensors"))
    ckpt.load_master_weights(model, zero, master)
    for k, v in zero.w2m.items():
        assert_bitwise_equal(v, want[k])
    dist.barrier()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_gathers_and_checkpoint_on_gloo(world, tmp_path):
    # fork where we can: the workers skip re-importing torch (seconds each on 2 cores).
    # Spawn on a CUDA machine: once anything here has asked CUDA a question (even
    # is_available), a forked child's CUDA calls fail, and Adam.step makes one.
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True, start_method=method)
