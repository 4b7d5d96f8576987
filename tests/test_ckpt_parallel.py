"""Gather-free checkpoints on gloo, world sizes 1 to 4 in one shared
temporary directory (one fork per world size, every case inside it): the
file every rank writes its own bytes of equals the gather path's byte for
byte and loads with plain safetensors; the sharded load reads only its own
bytes and round-trips bit for bit (from the gather path's file too); master
weights over two process groups; bad input (shape dict, header, truncated or
corrupted file, a full disk, ranks that do not share the directory, one rank
failing alone) raises on every rank within seconds and leaves the previous
file intact; CheckpointIO(parallel=True) and its fallback. Then SIGKILL of
one rank at every write phase and at random moments never leaves a loadable
wrong file."""

import datetime
import errno
import os
import random
import shutil
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_bitwise_equal
from safetensors.torch import load_file

from opensora_fast.utils import (
    _ckpt_agree,
    _ckpt_files,
    _ckpt_parallel,
    _ckpt_parallel_crc,
    _ckpt_parallel_io,
    _ckpt_write,
    ckpt,
)

SHAPES = [  # smaller than the world, 0-dim, odd, bf16 and fp32
    ("a.w", (5, 3), torch.float32),
    ("a.scalar", (), torch.float32),
    ("a.one", (1,), torch.bfloat16),
    ("b.w", (33, 17), torch.bfloat16),
    ("b.b", (7,), torch.bfloat16),
    ("c.big", (257,), torch.float32),
]
FAST = 10.0  # seconds: far below the process-group timeout set below


class Net(torch.nn.Module):
    def __init__(self, shapes=SHAPES, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for n, s, dt in shapes:
            self.register_parameter(n.replace(".", "_"), torch.nn.Parameter((torch.randn(s, generator=g) * 3).to(dt)))
        self.register_buffer("stat", torch.randn(3, generator=g))
        self.register_buffer("count", torch.tensor(7 + seed, dtype=torch.int64))


class FakeZero:
    """What the master-weight paths need of ColossalAI's LowLevelZeroOptimizer."""

    def __init__(self, model, group_of, shift=0.25):
        self.w2m, self.param_to_pg = {}, {}
        for n, p in model.named_parameters():
            pg = group_of(n)
            w, r = dist.get_world_size(pg), dist.get_rank(pg)
            flat = p.detach().float().reshape(-1) * 1.5 + shift
            flat = torch.nn.functional.pad(flat, [0, (w - flat.numel() % w) % w])
            s = flat.numel() // w
            self.w2m[id(p)] = flat[r * s : (r + 1) * s].clone()
            self.param_to_pg[p] = pg

    def get_working_to_master_map(self):
        return self.w2m

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        assert sd == {}


def _sharded(seed=0, shapes=SHAPES):
    net = Net(shapes, seed)
    full = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shape_dict = ckpt.record_model_param_shape(net)
    ckpt.model_sharding(net)
    return net, full, shape_dict


def _gather_file(net, shape_dict, path):
    """The gather path: model_gathering into host buffers, rank 0's writer."""
    pinned = None
    if dist.get_rank() == 0:
        pinned = {k: torch.empty(shape_dict[k], dtype=p.dtype) for k, p in net.named_parameters()}
        for k, v in net.state_dict().items():
            pinned.setdefault(k, torch.empty(v.shape, dtype=v.dtype))
    ckpt.model_gathering(net, shape_dict, pinned, progress=False)
    if dist.get_rank() == 0:
        _ckpt_write.write_safetensors(path, pinned)
    dist.barrier()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _fails_everywhere(rank, fn, exc, text, failing=None):
    """``fn`` raises on every rank within FAST seconds: ``exc`` with ``text``
    (on the failing rank, when one rank fails alone; the others then a
    RuntimeError naming it)."""
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        fn()
    assert time.monotonic() - t0 < FAST
    msg = str(info.value)
    if failing is None or rank == failing:
        assert isinstance(info.value, exc) and text in msg, repr(info.value)
    else:
        assert type(info.value) is RuntimeError and f"rank {failing} failed" in msg and text in msg, msg


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _cases(rank, world, os.path.join(tmp, f"w{world}"))
    finally:
        dist.destroy_process_group()


def _cases(rank, world, tmp):
    if rank == 0:
        os.makedirs(tmp)
    dist.barrier()
    net, full, shape_dict = _sharded()
    gpath, ppath = os.path.join(tmp, "gather.safetensors"), os.path.join(tmp, "par.safetensors")
    _gather_file(net, shape_dict, gpath)
    sums = ckpt.save_sharded_as_consolidated(net, shape_dict, ppath, progress=False, staging_bytes=64)
    # the same file, byte for byte; plain safetensors loads it; the CRC joined
    # from every rank's share is the file's
    assert sums == _ckpt_files.file_checksum(ppath)
    if rank == 0:
        assert _read(ppath) == _read(gpath)
        back = load_file(ppath)
        assert back.keys() == full.keys()
        for k, v in full.items():
            assert_bitwise_equal(back[k], v, k)
    assert not [n for n in os.listdir(tmp) if n.startswith(".")]  # no partial or probe file left

    # sharded load, from our file and from the gather path's: every shard bit for
    # bit, padding zero, reading only this rank's bytes (+ the buffers)
    read = [0]

    def counting(fd, bufs, pos):
        n = os.preadv(fd, bufs, pos)
        read[0] += n
        return n

    _ckpt_parallel.preadv = counting
    try:
        for path in (ppath, gpath):
            back, _, _ = _sharded(seed=5)
            for p in back.parameters():
                p.data.fill_(7)
            read[0] = 0
            got = ckpt.load_sharded_from_consolidated(back, path)
            assert got == {k: torch.Size(v) for k, v in shape_dict.items()} | {"stat": (3,), "count": ()}
            for (k, p), q in zip(back.named_parameters(), net.parameters()):
                assert_bitwise_equal(p.data, q.data, k)
            for k in ("stat", "count"):
                assert_bitwise_equal(back.state_dict()[k], full[k], k)
            own = sum(
                min(p.numel(), max(0, shape_dict[k].numel() - rank * p.numel())) * p.element_size()
                for k, p in net.named_parameters()
            )
            assert read[0] == own + 3 * 4 + 8, (read[0], own)
    finally:
        _ckpt_parallel.preadv = os.preadv

    # the staging path (device shards; here CPU ones forced through it) in
    # chunks of 64 bytes: the same file, the same round trip
    spath = os.path.join(tmp, "staged.safetensors")
    saved_direct, _ckpt_parallel._direct = _ckpt_parallel._direct, lambda t: False
    try:
        assert ckpt.save_sharded_as_consolidated(net, shape_dict, spath, staging_bytes=64) == sums
        back, _, _ = _sharded(seed=6)
        ckpt.load_sharded_from_consolidated(back, spath, checksum=sums, staging_bytes=64)
    finally:
        _ckpt_parallel._direct = saved_direct
    for (k, p), q in zip(back.named_parameters(), net.parameters()):
        assert_bitwise_equal(p.data, q.data, k)
    if rank == 0:
        assert _read(spath) == _read(gpath)

    # master weights over two process groups: the world, and halves of it
    halves = [list(range(0, (world + 1) // 2)), list(range((world + 1) // 2, world))]
    groups = [dist.new_group(h) if h else None for h in halves]
    half = groups[0] if rank in halves[0] else groups[1]
    model = Net(seed=3)
    zero = FakeZero(model, lambda n: dist.group.WORLD if n.startswith("a") else half)
    mg, mp_ = os.path.join(tmp, "mgather.safetensors"), os.path.join(tmp, "mpar.safetensors")
    pinned = {n: torch.empty(p.shape) for n, p in model.named_parameters()} if rank == 0 else None
    ckpt.master_weights_gathering(model, zero, pinned, progress=False)
    if rank == 0:
        _ckpt_write.write_safetensors(mg, pinned)
    msum = ckpt.save_master_sharded_as_consolidated(model, zero, mp_)
    assert msum == _ckpt_files.file_checksum(mp_)
    if rank == 0:
        assert _read(mp_) == _read(mg)
    want = {k: v.clone() for k, v in zero.w2m.items()}
    for path in (mp_, mg):
        for v in zero.w2m.values():
            v.fill_(-3)
        ckpt.load_master_sharded_from_consolidated(model, zero, path, checksum=msum)
        for k, v in zero.w2m.items():
            assert_bitwise_equal(v, want[k])

    # bad input, each raised on every rank before anything is written
    bad = dict(shape_dict, b_w=torch.Size([40, 17]))
    out = os.path.join(tmp, "bad.safetensors")
    _fails_everywhere(
        rank, lambda: ckpt.save_sharded_as_consolidated(net, bad, out), ValueError, "'b_w' has a local shard"
    )
    assert not os.path.exists(out)
    last = world - 1  # one rank alone with a bad shape dict: the others are released too
    _fails_everywhere(
        rank,
        lambda: ckpt.save_sharded_as_consolidated(net, bad if rank == last else shape_dict, out),
        ValueError,
        "'b_w' has a local shard",
        failing=last if world > 1 else None,
    )
    assert not os.path.exists(out)
    wrong_dtype, _, _ = _sharded(shapes=[(n, s, torch.float32) for n, s, _ in SHAPES])
    _fails_everywhere(
        rank, lambda: ckpt.load_sharded_from_consolidated(wrong_dtype, ppath), ValueError, "holds 'a_one' as BF16"
    )
    renamed, _, _ = _sharded(shapes=[("z" + n, s, dt) for n, s, dt in SHAPES])
    _fails_everywhere(
        rank, lambda: ckpt.load_sharded_from_consolidated(renamed, ppath), ValueError, "missing ['za_one'"
    )
    if world > 1:
        reshaped, _, _ = _sharded(shapes=[(n, (s[0] * 4,) if n == "c.big" else s, dt) for n, s, dt in SHAPES])
        _fails_everywhere(
            rank, lambda: ckpt.load_sharded_from_consolidated(reshaped, ppath), ValueError, "holds 'c_big' of shape"
        )
    unsharded = Net()
    if world > 1:
        _fails_everywhere(
            rank, lambda: ckpt.load_sharded_from_consolidated(unsharded, ppath), ValueError, "not a 1-D shard"
        )
    trunc = os.path.join(tmp, "trunc.safetensors")
    if rank == 0:
        shutil.copy(ppath, trunc)
        os.truncate(trunc, os.path.getsize(ppath) - 3)
    dist.barrier()
    target, _, _ = _sharded(seed=9)
    before = [p.detach().clone() for p in target.parameters()]
    _fails_everywhere(rank, lambda: ckpt.load_sharded_from_consolidated(target, trunc), ValueError, "is truncated")
    corrupt = os.path.join(tmp, "corrupt.safetensors")
    if rank == 0:
        raw = bytearray(_read(ppath))
        raw[-2] ^= 1  # inside rank (world-1)'s bytes of the last tensor
        with open(corrupt, "wb") as f:
            f.write(raw)
    dist.barrier()
    _fails_everywhere(
        rank,
        lambda: ckpt.load_sharded_from_consolidated(target, corrupt, checksum=sums),
        ValueError,
        "is corrupted",
    )
    for p, b in zip(target.parameters(), before):  # nothing loaded
        assert_bitwise_equal(p.data, b)

    # a full disk: at preallocation (rank 0), or mid-write on the last rank; the
    # previous file stays as it was, the partial file is removed
    old = _read(ppath)
    net2, _, _ = _sharded(seed=11)

    def enospc(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    for where, failing in (("preallocate", 0), ("pwrite", last)):
        saved = getattr(_ckpt_parallel, where)
        if rank == failing:
            setattr(_ckpt_parallel, where, enospc)
        try:
            _fails_everywhere(
                rank,
                lambda: ckpt.save_sharded_as_consolidated(net2, shape_dict, ppath),
                OSError,
                "No space left",
                failing=failing if world > 1 else None,
            )
        finally:
            setattr(_ckpt_parallel, where, saved)
        dist.barrier()  # rank 0 removes the partial file as it raises
        assert _read(ppath) == old
        assert not [n for n in os.listdir(tmp) if n.startswith(".")], (where, os.listdir(tmp))
        dist.barrier()  # rank 0 creates the next partial file before the next save's first collective

    # a rank that failed before the save (in an agreement elsewhere) releases
    # the others at the save's first collective
    if world > 1:
        _fails_everywhere(
            rank,
            (lambda: _ckpt_agree.agree("elsewhere", "boom"))
            if rank == last
            else (lambda: ckpt.save_sharded_as_consolidated(net2, shape_dict, ppath)),
            ValueError,
            "boom",
            failing=last,
        )
        dist.barrier()
        assert _read(ppath) == old
        assert not [n for n in os.listdir(tmp) if n.startswith(".")]

    # ranks that do not share the directory (simulated: one folder per rank),
    # a stale partial file of the same name in the others' folders: nobody
    # writes into a file that is not rank 0's
    own_dir = os.path.join(tmp, f"r{rank}")
    os.makedirs(own_dir)
    if world > 1:
        stale = os.path.join(own_dir, ".x.safetensors.partial")
        if rank:
            shutil.copy(ppath, stale)
        _fails_everywhere(
            rank,
            lambda: ckpt.save_sharded_as_consolidated(net, shape_dict, os.path.join(own_dir, "x.safetensors")),
            ValueError,
            "do not all see the same directory",
        )
        dist.barrier()
        assert os.listdir(own_dir) == ([".x.safetensors.partial"] if rank else [])
        if rank:
            assert _read(stale) == old
            os.remove(stale)
    # ... where CheckpointIO falls back to the gather path, with one log line;
    # it probes a save_dir once (at its first save there), every rank alike
    logged, probes = [], []
    saved_log, _ckpt_parallel_io.log_message = _ckpt_parallel_io.log_message, lambda *a, **k: logged.append(a)
    saved_probe = _ckpt_parallel_io.shared_dir
    _ckpt_parallel_io.shared_dir = lambda *a: probes.append(a[1]) or saved_probe(*a)
    try:
        io = ckpt.CheckpointIO(progress=False)
        for step in (1, 2):
            out = io.save(
                None,
                own_dir,
                ema=net,
                epoch=0,
                step=step,
                actual_update_step=step,
                ema_shape_dict=shape_dict,
                parallel=True,
            )
            io.close()
            if rank == 0:
                assert _read(os.path.join(out, "ema.safetensors")) == old
    finally:
        _ckpt_parallel_io.log_message = saved_log
    assert len(logged) == (1 if rank == 0 and world > 1 else 0), logged
    # one process with async_io: nothing to gather, so the background write and no probe
    assert len(probes) == (1 if world > 1 else 0), probes

    # CheckpointIO(parallel=True): the same files as the gather path's (EMA and
    # master weights, checksums recorded); loads with parallel=True, from a
    # gather-path checkpoint too; a corrupted file is refused
    zero_w = FakeZero(model, lambda n: dist.group.WORLD, shift=0.5)
    ckdir = os.path.join(tmp, "ck")
    outs, probes[:] = [], []
    ios = {par: ckpt.CheckpointIO(progress=False) for par in (False, True)}  # parallel: two saves, one probe
    try:
        for step, par in ((1, False), (2, True), (3, True)):
            io = ios[par]
            kw = dict(model=model, ema=net, optimizer=zero_w, include_master_weights=True, ema_shape_dict=shape_dict)
            outs.append(io.save(None, ckdir, epoch=0, step=step, actual_update_step=step, parallel=par, **kw))
            io.close()
            dist.barrier()
    finally:
        _ckpt_parallel_io.shared_dir = saved_probe
    assert probes == ([_ckpt_files.partial_name(outs[1])] if world > 1 else []), probes
    assert (ios[True].pinned_state_dict is None) == (world > 1)  # host buffers: only where nothing is gathered
    for f in ("ema.safetensors", "master.safetensors"):
        assert _read(os.path.join(outs[0], f)) == _read(os.path.join(outs[1], f)) == _read(os.path.join(outs[2], f)), f
    outs = outs[:2]
    states = [ckpt.load_json(os.path.join(o, "running_states.json"))["checksums"] for o in outs]
    assert states[0]["ema.safetensors"] == states[1]["ema.safetensors"]
    assert states[0]["master.safetensors"] == states[1]["master.safetensors"]
    want_m = {k: v.clone() for k, v in zero_w.w2m.items()}
    for o in outs:
        back, _, _ = _sharded(seed=21)
        for v in zero_w.w2m.values():
            v.zero_()
        io = ckpt.CheckpointIO()
        assert (
            io.load(None, o, model=model, ema=back, optimizer=zero_w, include_master_weights=True, parallel=True)[0]
            == 0
        )
        for (k, p), q in zip(back.named_parameters(), net.parameters()):
            assert_bitwise_equal(p.data, q.data, k)
        for k, v in zero_w.w2m.items():
            assert_bitwise_equal(v, want_m[k])
    if rank == 0:
        f = os.path.join(outs[1], "ema.safetensors")
        raw = bytearray(_read(f))
        raw[-1] ^= 4
        with open(f, "wb") as fh:
            fh.write(raw)
    dist.barrier()
    back, _, _ = _sharded(seed=21)
    _fails_everywhere(
        rank, lambda: ckpt.CheckpointIO().load(None, outs[1], ema=back, parallel=True), ValueError, "is corrupted"
    )
    dist.barrier()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_crc_from_shares():
    import zlib

    rng = random.Random(0)
    data = os.urandom(5000)
    for _ in range(20):
        cuts = [0] + sorted(rng.sample(range(1, len(data)), 7)) + [len(data)]
        shares = []
        for a, b in zip(cuts, cuts[1:]):
            p = _ckpt_parallel_crc.Pieces(len(data))
            p.add(a, data[a:b])
            shares.append(p.value())
        assert _ckpt_parallel_crc.file_crc(len(data), shares) == zlib.crc32(data)


def test_parallel_checkpoints_on_gloo(tmp_path):
    # fork (no re-import of torch); world sizes 1 to 4 one after another in one
    # shared temporary directory
    method = "spawn" if torch.cuda.is_available() else "fork"
    for world in (1, 2, 3, 4):
        mp.start_processes(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True, start_method=method)


KILL_SHAPES = [(f"p{i}", (1000 + 37 * i,), torch.bfloat16 if i % 2 else torch.float32) for i in range(12)]


def _kill_worker(rank, world, port, path, seed, kill_rank, kill_phase):
    """One save of seed ``seed`` to ``path``; rank ``kill_rank`` SIGKILLs
    itself at its ``kill_phase``-th write phase (0: never)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    net, _, shape_dict = _sharded(seed, KILL_SHAPES)
    if rank == kill_rank and kill_phase:
        count = [0]

        def hook(_name):
            count[0] += 1
            if count[0] == kill_phase:
                os.kill(os.getpid(), signal.SIGKILL)

        _ckpt_write.phase_hook = hook
    try:
        ckpt.save_sharded_as_consolidated(net, shape_dict, path, progress=False)
    except Exception:
        os._exit(3)  # the survivor of a killed rank: an error, not a hang
    os._exit(0)


def _run_save(path, seed, kill_rank=0, kill_phase=0, kill_after=None, world=2):
    ctx = mp.get_context("fork")
    port = _port()
    procs = [
        ctx.Process(target=_kill_worker, args=(r, world, port, path, seed, kill_rank, kill_phase)) for r in range(world)
    ]
    for p in procs:
        p.start()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(procs[kill_rank].pid, signal.SIGKILL)
    for p in procs:
        p.join(30)
        assert p.exitcode is not None, "a rank hung"
    return [p.exitcode for p in procs]


def _phases(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, _, shape_dict = _sharded(2, KILL_SHAPES)
    seen = []
    _ckpt_write.phase_hook = seen.append
    ckpt.save_sharded_as_consolidated(net, shape_dict, os.path.join(out, "probe.safetensors"))
    ckpt.save_json(seen, os.path.join(out, f"phases{rank}.json"))
    dist.destroy_process_group()


def test_sigkill_of_one_rank_never_leaves_a_loadable_wrong_file(tmp_path):
    world = 2
    base, new = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    assert _run_save(base, 1) == [0, 0] and _run_save(new, 2) == [0, 0]
    old_bytes, new_bytes = _read(base), _read(new)
    mp.start_processes(_phases, args=(world, _port(), str(tmp_path)), nprocs=world, start_method="fork")
    phases = [ckpt.load_json(str(tmp_path / f"phases{r}.json")) for r in range(world)]
    assert phases[0][0] == "par-prealloc" and phases[0][-1] == "par-renamed" and "par-written" in phases[1]
    # every distinct phase of rank 0, the first and last piece of rank 1, random moments
    points = [(0, phases[0].index(n) + 1, None) for n in dict.fromkeys(phases[0])]
    points += [(0, len(phases[0]) - 3, None), (1, 1, None), (1, len(phases[1]), None)]
    rng = random.Random(0)
    points += [(rng.randrange(world), 0, rng.uniform(0.05, 0.6)) for _ in range(4)]
    seen = set()
    for i, (who, at, after) in enumerate(points):
        d = tmp_path / f"run{i}"
        d.mkdir()
        path = str(d / "ema.safetensors")
        shutil.copy(base, path)
        codes = _run_save(path, 2, who, at, after)
        if after is None:  # the killed rank was killed; the other raised or finished, never hung
            assert codes[who] == -signal.SIGKILL and set(codes) <= {-signal.SIGKILL, 0, 3}, codes
        got = _read(path)
        assert got in (old_bytes, new_bytes), i  # the old file intact, or the new one complete
        seen.add("new" if got == new_bytes else "old")
        partial = str(d / ".ema.safetensors.partial")
        if os.path.exists(partial):
            seen.add("partial")
            try:
                loaded = load_file(partial)
            except Exception:
                continue  # not loadable: its header is written last
            assert _read(partial) == new_bytes  # loadable only once complete (killed just before the rename)
            assert loaded.keys()
    assert {"old", "new", "partial"} <= seen, seen
