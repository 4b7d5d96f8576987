"""CheckpointIO's files, one process: every file and the directory fsynced
before the rename; checksums recorded and verified; the counters that name a
checkpoint refused unless integers; host buffers made again when the EMA's
dtype or shapes change; a failed background write raised at _sync_io, close
and the next save; save_json atomic when the write fails halfway;
rm_checkpoints by number, on a listed (not globbed) save_dir; rename_keys as
upstream applies it."""

import json
import os

import pytest
import torch
from helpers import assert_bitwise_equal
from safetensors.torch import load_file, save_file

from opensora_fast.utils import _ckpt_exit, _ckpt_files, _ckpt_write, ckpt


class Net(torch.nn.Module):
    def __init__(self, seed=0, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(7, generator=g))
        self.register_buffer("n", torch.tensor(seed))


class Sampler:
    def __init__(self, seed=0):
        self.state = {"seed": seed}

    def state_dict(self, step):
        return {"seed": self.state["seed"], "step": step, "order": torch.arange(5) + self.state["seed"]}

    def load_state_dict(self, sd):
        self.state = sd


def _parts(seed):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.weight.grad = torch.ones(3, 4)
    model.bias.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    return dict(model=model, ema=Net(seed), optimizer=opt, lr_scheduler=sched, sampler=Sampler(seed))


def _save(io, root, step, parts, **kw):
    return io.save(
        None,
        str(root),
        epoch=0,
        step=step,
        global_step=step,
        actual_update_step=step,
        ema_shape_dict=ckpt.record_model_param_shape(parts["ema"]),
        **parts,
        **kw,
    )


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_bitwise_equal(sa[k], sb[k], k)


# ----------------------------------------------------------------- fsync before the rename


@pytest.mark.parametrize("async_io", [True, False])
def test_every_file_and_the_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch, async_io):
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b, *args, **kw):
        events.append(("rename", os.path.abspath(a), os.path.abspath(b)))
        return real_rename(a, b, *args, **kw)

    def replace(a, b, *args, **kw):
        events.append(("replace", os.path.abspath(a), os.path.abspath(b)))
        return real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    io = ckpt.CheckpointIO()
    final = os.path.abspath(_save(io, tmp_path, 1, _parts(1), async_io=async_io))
    io._sync_io()
    monkeypatch.undo()
    tmp = os.path.join(os.path.dirname(final), ".epoch0-global_step1.partial")
    done = [i for i, e in enumerate(events) if e == ("rename", tmp, final)]
    assert len(done) == 1, events
    before = events[: done[0]]
    synced = {e[1] for e in before if e[0] == "fsync"}
    # a file renamed into place (save_json) counts when its temporary name was fsynced, then replaced
    moved = {e[2]: e[1] for e in before if e[0] == "replace"}
    names = sorted(os.listdir(final))
    assert names == [
        "ema.safetensors",
        "lr_scheduler.pt",
        "model.safetensors",
        "optimizer.pt",
        "running_states.json",
        "sampler",
    ]
    for name in names:
        path = os.path.join(tmp, name)
        assert path in synced or moved.get(path) in synced, f"{name} not fsynced before the rename"
    # the directory after its last entry was made, and its parent after the rename
    last_entry = max(i for i, e in enumerate(before) if e[0] == "replace")
    assert ("fsync", tmp) in before[last_entry:], "the directory was not fsynced before the rename"
    assert ("fsync", os.path.dirname(final)) in events[done[0] :], "the rename itself was not made durable"


# ----------------------------------------------------------------- checksums


def _flip_bit(path, offset_from_end=1, bit=0):
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def test_checksums_recorded_and_a_flipped_bit_is_an_error_naming_the_file(tmp_path):
    io = ckpt.CheckpointIO()
    parts = _parts(3)
    path = _save(io, tmp_path, 1, parts)
    io._sync_io()
    sums = json.load(open(os.path.join(path, "running_states.json")))["checksums"]
    assert sorted(sums) == ["ema.safetensors", "lr_scheduler.pt", "model.safetensors", "optimizer.pt", "sampler"]
    for name, value in sums.items():  # computed while writing = the bytes on disk
        assert value == _ckpt_files.file_checksum(os.path.join(path, name)) and value.startswith("crc32:")
    # the intact checkpoint loads, everything verified
    back = _parts(4)
    assert io.load(None, path, **back, strict=True) == (0, 1)
    _same(back["ema"], parts["ema"])

    # one bit of the last tensor byte of the EMA: a valid safetensors file, wrong data
    _flip_bit(os.path.join(path, "ema.safetensors"), bit=3)
    target = Net(9)
    with pytest.raises(ValueError, match=r"ema\.safetensors is corrupted: its checksum is crc32:"):
        io.load(None, path, ema=target)
    _same(target, Net(9))  # nothing loaded
    io.load(None, path, ema=target, verify=False)  # skippable: loads the damaged bytes
    assert not torch.equal(target.state_dict()["w"], parts["ema"].state_dict()["w"]) or not torch.equal(
        target.state_dict()["b"], parts["ema"].state_dict()["b"]
    )
    # a load that does not read the damaged file is not refused
    io.load(None, path, optimizer=back["optimizer"], sampler=Sampler())

    _flip_bit(os.path.join(path, "optimizer.pt"), offset_from_end=200, bit=0)
    with pytest.raises(ValueError, match=r"optimizer\.pt is corrupted"):
        io.load(None, path, optimizer=back["optimizer"], verify=True)
    os.remove(os.path.join(path, "sampler"))
    with pytest.raises(FileNotFoundError, match=r"sampler is missing"):
        io.load(None, path, sampler=Sampler())
    # a checkpoint without checksums (written before them, or by upstream) loads
    states = json.load(open(os.path.join(path, "running_states.json")))
    del states["checksums"]
    ckpt.save_json(states, os.path.join(path, "running_states.json"))
    io.load(None, path, ema=Net(0), verify=True)


# ----------------------------------------------------------------- counters


@pytest.mark.parametrize(
    "arg, value, exc, text",
    [
        ("epoch", "0/../../x", TypeError, "epoch must be a non-negative int, got str"),
        ("epoch", 1.0, TypeError, "epoch must be a non-negative int, got float"),
        ("epoch", True, TypeError, "epoch must be a non-negative int, got bool"),
        ("epoch", None, TypeError, "epoch must be a non-negative int, got NoneType"),
        ("epoch", -1, ValueError, "epoch must be a non-negative int, got -1"),
        ("actual_update_step", "7", TypeError, "actual_update_step must be a non-negative int"),
        ("actual_update_step", -3, ValueError, "actual_update_step must be a non-negative int"),
        ("step", 2.5, TypeError, "step must be a non-negative int"),
        ("step", False, TypeError, "step must be a non-negative int, got bool"),
        ("global_step", "3", TypeError, "global_step must be a non-negative int"),
        ("batch_size", 0.5, TypeError, "batch_size must be a non-negative int"),
        ("step", torch.tensor(1.5), TypeError, "step must be a non-negative int"),
    ],
)
def test_counters_must_be_integers_nothing_written(tmp_path, arg, value, exc, text):
    root = tmp_path / "exp"
    root.mkdir()
    kw = dict(epoch=0, step=1, global_step=1, actual_update_step=1)
    kw[arg] = value
    ema = Net()
    with pytest.raises(exc, match="CheckpointIO.save: " + text):
        ckpt.CheckpointIO().save(None, str(root), ema=ema, ema_shape_dict=ckpt.record_model_param_shape(ema), **kw)
    assert sorted(os.listdir(tmp_path)) == ["exp"] and os.listdir(root) == []


def test_counters_accept_integer_likes(tmp_path):
    import numpy as np

    ema = Net()
    io = ckpt.CheckpointIO()
    path = io.save(
        None,
        str(tmp_path),
        ema=ema,
        epoch=np.int64(2),
        step=torch.tensor(5),
        global_step=None,
        batch_size=None,
        actual_update_step=np.int32(7),
        ema_shape_dict=ckpt.record_model_param_shape(ema),
    )
    io._sync_io()
    assert os.path.basename(path) == "epoch2-global_step7"
    states = json.load(open(os.path.join(path, "running_states.json")))
    assert (states["epoch"], states["step"], states["global_step"], states["actual_update_step"]) == (2, 5, None, 7)


# ----------------------------------------------------------------- reused CheckpointIO


def test_reused_checkpointio_follows_the_emas_dtype_and_shapes(tmp_path):
    io = ckpt.CheckpointIO()
    ema = Net(1)
    p1 = _save(io, tmp_path, 1, {"ema": ema})
    io._sync_io()
    ema = ema.float()  # bf16 -> fp32: the buffers of the first save no longer fit
    p2 = _save(io, tmp_path, 2, {"ema": ema})
    io._sync_io()
    got = load_file(os.path.join(p2, "ema.safetensors"))
    assert got["w"].dtype == torch.float32
    for k, v in ema.state_dict().items():
        assert_bitwise_equal(got[k], v, k)
    assert load_file(os.path.join(p1, "ema.safetensors"))["w"].dtype == torch.bfloat16
    # a reshaped parameter, recorded again: saved at its new shape
    with torch.no_grad():
        ema.w = torch.nn.Parameter(ema.w.detach().reshape(5, 6).clone())
    p3 = _save(io, tmp_path, 3, {"ema": ema})
    io._sync_io()
    got = load_file(os.path.join(p3, "ema.safetensors"))
    assert got["w"].shape == (5, 6)
    assert_bitwise_equal(got["w"], ema.w.detach())
    # a parameter that no longer matches its recorded shape: refused, nothing written
    shapes = ckpt.record_model_param_shape(ema)
    ema.b = torch.nn.Parameter(torch.zeros(9))
    with pytest.raises(ValueError, match=r"CheckpointIO.save: the EMA's 'b' has shape \[9\].*records shape \[7\]"):
        io.save(
            None, str(tmp_path), ema=ema, epoch=0, step=4, global_step=4, actual_update_step=4, ema_shape_dict=shapes
        )
    assert sorted(os.listdir(tmp_path)) == ["epoch0-global_step1", "epoch0-global_step2", "epoch0-global_step3"]


# ----------------------------------------------------------------- a failed background write


def test_failed_background_write_raises_at_sync_close_and_next_save(tmp_path, monkeypatch):
    io = ckpt.CheckpointIO()
    good = _save(io, tmp_path, 1, {"ema": Net(1)})
    io._sync_io()
    real = ckpt._write_safetensors
    import threading

    failed = threading.Event()

    def disk_full(path, tensors, show=False):
        failed.set()
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(_ckpt_write, "write_safetensors", disk_full)
    _save(io, tmp_path, 2, {"ema": Net(2)})  # returns: the write fails in the background
    with pytest.raises(RuntimeError, match=r"writing .*epoch0-global_step2 failed: OSError: .*No space left"):
        io._sync_io()
    io._sync_io()  # reported once
    _save(io, tmp_path, 3, {"ema": Net(3)})
    with pytest.raises(RuntimeError, match=r"epoch0-global_step3 failed"):
        io.close()
    failed.clear()
    _save(io, tmp_path, 4, {"ema": Net(4)})
    assert failed.wait(10)
    monkeypatch.setattr(_ckpt_write, "write_safetensors", real)
    with pytest.raises(RuntimeError, match=r"epoch0-global_step4 failed"):  # at the next save, which is not made
        _save(io, tmp_path, 5, {"ema": Net(5)})
    assert sorted(os.listdir(tmp_path)) == ["epoch0-global_step1"]  # no partial left behind
    assert _ckpt_exit.unreported() == []  # every failure reached a caller: the exit status stays 0
    back = Net(0)
    io.load(None, good, ema=back, strict=True)
    _same(back, Net(1))
    path = _save(io, tmp_path, 5, {"ema": Net(5)})  # and the next save works
    io.close()
    assert ckpt._is_complete(path)


# ----------------------------------------------------------------- save_json, rm_checkpoints, rename_keys


def test_save_json_failing_halfway_keeps_the_old_file(tmp_path):
    p = str(tmp_path / "states.json")
    ckpt.save_json({"a": 1, "b": [1, 2]}, p)
    # json.dump streams: "{"a": 2, "b": " reaches the file before the object fails to serialise
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.save_json({"a": 2, "b": object()}, p)
    assert ckpt.load_json(p) == {"a": 1, "b": [1, 2]}
    assert os.listdir(tmp_path) == ["states.json"]


def _fake_checkpoint(root, epoch, step):
    d = os.path.join(root, f"epoch{epoch}-global_step{step}")
    os.makedirs(d)
    ckpt.save_json({"epoch": epoch, "step": step}, os.path.join(d, "running_states.json"))
    open(os.path.join(d, "ema.safetensors"), "wb").write(b"x")
    return d


def test_rm_checkpoints_orders_by_number_not_name(tmp_path):
    # by name, "epoch2" > "epoch10" and "global_step9" > "global_step10"
    made = [_fake_checkpoint(str(tmp_path), e, s) for e, s in [(1, 8), (1, 9), (1, 10), (2, 11), (10, 12)]]
    ckpt.rm_checkpoints(str(tmp_path), keep_n_latest=4)
    assert [ckpt._is_complete(d) for d in made] == [False, True, True, True, True]
    ckpt.rm_checkpoints(str(tmp_path), keep_n_latest=2)
    assert [ckpt._is_complete(d) for d in made] == [False, False, False, True, True]
    assert os.listdir(made[0]) == []


def test_rm_checkpoints_does_not_read_save_dir_as_a_pattern(tmp_path):
    other = [_fake_checkpoint(str(tmp_path / "exp1"), 0, s) for s in (1, 2, 3)]
    mine = [_fake_checkpoint(str(tmp_path / "exp[12]"), 0, s) for s in (4, 5)]
    ckpt.rm_checkpoints(str(tmp_path / "exp[12]"), keep_n_latest=1)
    assert all(ckpt._is_complete(d) for d in other), "another run's checkpoints were removed"
    assert [ckpt._is_complete(d) for d in mine] == [False, True]
    assert all(os.listdir(d) == ["ema.safetensors", "running_states.json"] for d in other)


class Outer(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.blk = torch.nn.Module()
        self.blk.lin = torch.nn.Linear(3, 2)
        self.head = torch.nn.Linear(2, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def test_rename_keys_as_upstream_applies_them(tmp_path):
    """Upstream's rule: the first old key in the mapping found anywhere in a
    checkpoint key (not only at its start) is replaced, every occurrence."""
    src = Outer(1)
    sd = {k.replace("lin.", "proj.").replace("head.", "top.top."): v.contiguous() for k, v in src.state_dict().items()}
    assert set(sd) == {"blk.proj.weight", "blk.proj.bias", "top.top.weight", "top.top.bias"}
    st, pt = str(tmp_path / "m.safetensors"), str(tmp_path / "m.pt")
    save_file(sd, st)
    torch.save(sd, pt)
    # "proj." sits inside the key; "top." twice (both replaced: "top.top." -> "head."
    # needs {"top.top.": "head."}; {"top.": ...} would give "headhead."); first match wins
    renames = {"proj.": "lin.", "top.top.": "head.", "top.": "never."}
    for path in (st, pt):
        _same(ckpt.load_checkpoint(Outer(2), path, strict=True, rename_keys=renames), src)
    assert set(ckpt._rename({"a.x.b.x.c": 0}, {"x.": "y."})) == {"a.y.b.y.c"}
