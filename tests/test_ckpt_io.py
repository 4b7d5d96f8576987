"""Checkpoint files without a process group: load_checkpoint (safetensors,
.pt with weights_only, rename_keys, the hub form offline, sharded directories
without colossalai), corrupted and truncated files, a pickle that would run
code, CheckpointIO's refusals and rm_checkpoints."""

import json
import os
import pickle

import pytest
import torch
from helpers import assert_bitwise_equal
from safetensors.torch import load_file, save_file

from opensora_fast.utils import _ckpt_io, _ckpt_write, ckpt


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 4, generator=g))
            self.lin.bias.copy_(torch.randn(3, generator=g))
        self.scale = torch.nn.Parameter(torch.randn((), generator=g).bfloat16())
        self.register_buffer("steps", torch.tensor(3))


def _same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_bitwise_equal(sa[k], sb[k], k)


# ----------------------------------------------------------------- load_checkpoint


def test_safetensors_and_pt_round_trip_and_rename_keys(tmp_path):
    src = Net(1)
    st = str(tmp_path / "m.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, st)
    _same(ckpt.load_checkpoint(Net(2), st, strict=True), src)
    pt = str(tmp_path / "m.pt")
    torch.save(src.state_dict(), pt)
    _same(ckpt.load_checkpoint(Net(2), pt, strict=True), src)
    # rename_keys: old prefix -> new prefix, in both formats
    old = {k.replace("lin.", "proj."): v for k, v in src.state_dict().items()}
    save_file({k: v.contiguous() for k, v in old.items()}, st)
    torch.save(old, pt)
    for path in (st, pt):
        _same(ckpt.load_checkpoint(Net(2), path, strict=True, rename_keys={"proj.": "lin."}), src)
        with pytest.raises(RuntimeError, match="Missing key"):
            ckpt.load_checkpoint(Net(2), path, strict=True)


def test_our_safetensors_writer_is_read_by_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.tensor(2.5),
        "c": torch.zeros(0, 4),
        "d": torch.arange(7, dtype=torch.int64),
        "e": torch.tensor([True, False]),
        "f": torch.randn(9).half(),
    }
    path = str(tmp_path / "x.safetensors")
    ckpt._write_safetensors(path, tensors)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape
        assert torch.equal(back[k], tensors[k])


class _Evil:
    """Unpickling it would create a file: proof that the code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        torch.save({"lin.weight": torch.zeros(3, 4), "x": _Evil(marker)}, f)
    with pytest.raises(pickle.UnpicklingError, match="refused by weights_only loading"):
        ckpt.load_checkpoint(Net(), path)
    assert not os.path.exists(marker), "the pickle's code ran"
    # the opt-out for trusted legacy files does run it: the check above can fail
    ckpt.load_checkpoint(Net(), path, weights_only=False)
    assert os.path.exists(marker)


@pytest.mark.parametrize("damage", ["truncated", "corrupted header", "bad length", "garbage", "empty"])
def test_damaged_safetensors_name_the_file(tmp_path, damage):
    path = str(tmp_path / "m.safetensors")
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, path)
    data = open(path, "rb").read()
    data = {
        "truncated": data[: len(data) - 5],
        "corrupted header": data[:8] + b"[" + data[9:],
        "bad length": b"\xff" * 8 + data[8:],
        "garbage": b"\xff" * 64,
        "empty": b"",
    }[damage]
    open(path, "wb").write(data)
    m = Net(5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="m.safetensors: not a valid safetensors file"):
        ckpt.load_checkpoint(m, path)
    for k, v in m.state_dict().items():
        assert_bitwise_equal(v, before[k], k)


def test_hub_form_offline_from_a_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    src = Net(4)
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--somerepo" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    (cache / "models--someorg--somerepo" / "refs").mkdir()
    (cache / "models--someorg--somerepo" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # no network: the cache or an error
    monkeypatch.chdir(tmp_path)
    _same(ckpt.load_checkpoint(Net(0), "someorg/somerepo/model.safetensors", cache_dir=str(cache), strict=True), src)
    with pytest.raises(Exception, match="(?i)offline|cannot find|not.*found|LocalEntryNotFound"):
        ckpt.load_checkpoint(Net(0), "someorg/somerepo/other.safetensors", cache_dir=str(cache))


def test_sharded_directory_needs_colossalai(tmp_path):
    try:
        import colossalai  # noqa: F401

        pytest.skip("colossalai is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install opensora_fast\[colossalai\]"):
        ckpt.load_checkpoint(Net(), str(tmp_path))


def test_remove_padding_and_shapes():
    t = torch.arange(10.0)
    assert ckpt.remove_padding(t, ()).tolist() == [0.0]
    assert ckpt.remove_padding(t, (2, 3)).tolist() == list(range(6))
    assert ckpt.record_model_param_shape(Net()) == {"lin.weight": (3, 4), "lin.bias": (3,), "scale": ()}


def test_pinned_dict_segments(monkeypatch):
    """CheckpointIO's host buffers: views side by side in segments of at most
    PIN_SEGMENT_BYTES per dtype, in order; a larger tensor gets its own."""
    monkeypatch.setattr(_ckpt_io, "PIN_SEGMENT_BYTES", 64)
    entries = [
        ("a", (5, 3), torch.float32),
        ("b", (), torch.float32),
        ("h", (7,), torch.bfloat16),
        ("c", (2,), torch.float32),
        ("big", (40,), torch.float32),
        ("d", (3,), torch.float32),
        ("e", (0,), torch.float32),
        ("h2", (30,), torch.bfloat16),
    ]
    out = ckpt.CheckpointIO._pinned_dict(entries)
    assert list(out) == [k for k, _, _ in entries]
    for k, shape, dt in entries:
        assert out[k].shape == shape and out[k].dtype == dt and out[k].is_contiguous()
    seg = lambda k: out[k].untyped_storage().data_ptr()  # noqa: E731
    # 64 bytes = 16 fp32: a(15) + b(1) fill one segment; c opens the next; big (40) gets its own
    assert seg("a") == seg("b") != seg("c") and seg("c") != seg("big") != seg("d")
    assert ckpt._side_by_side([out["a"], out["b"]]) and ckpt._side_by_side([out["d"], out["e"]])
    assert seg("h") != seg("h2")  # 7 + 30 bf16 = 74 bytes: over 64 bytes, so two segments
    starts = ckpt._run_starts([out[k] for k, _, _ in entries if out[k].dtype == torch.float32])
    assert starts == [0, 2, 3, 4]  # a+b | c | big | d (+ the empty e)
    for v in out.values():  # writable, independent
        v.fill_(1)
    assert all(bool((v == 1).all()) for v in out.values())


def test_bucket_planning_splits_at_bucket_ends_only():
    items = [ckpt._Item(str(n), torch.zeros(n), n, None) for n in [5, 1, 0, 12, 3]]
    for cols in (1, 2, 4, 7, 100):
        buckets = list(ckpt._plan_buckets(items, cols))
        assert len(buckets) == -(-sum(it.shard.numel() for it in items) // cols)
        seen = {}
        for b in buckets:
            names = [e.item.name for e in b]
            assert len(names) == len(set(names)), "a bucket holds one piece of a shard"
            assert sum(e.count for e in b) <= cols
            for e in b:
                assert e.begin == seen.get(e.item.name, 0)
                seen[e.item.name] = e.begin + e.count
        assert seen == {str(n): n for n in [5, 1, 12, 3]}
    with pytest.raises(ValueError, match="bucket_bytes=7 holds less than one torch.float32 element per rank"):
        ckpt._bucket_cols(7, 2, torch.float32, "model_gathering")


# ----------------------------------------------------------------- CheckpointIO, one process


def _save(io, tmp, ema, step, **kw):
    return io.save(
        None,
        str(tmp),
        ema=ema,
        epoch=0,
        step=step,
        global_step=step,
        actual_update_step=step,
        ema_shape_dict=ckpt.record_model_param_shape(ema),
        **kw,
    )


def test_checkpointio_round_trip_and_refusals(tmp_path):
    ema = Net(7)
    io = ckpt.CheckpointIO()
    path = _save(io, tmp_path, ema, 1)
    io._sync_io()
    assert sorted(os.listdir(path)) == ["ema.safetensors", "running_states.json"]
    assert json.load(open(os.path.join(path, "running_states.json")))["actual_update_step"] == 1
    back = Net(8)
    assert io.load(None, path, ema=back, strict=True) == (0, 1)
    _same(back, ema)
    # a complete checkpoint at the target is never overwritten
    before = open(os.path.join(path, "ema.safetensors"), "rb").read()
    with pytest.raises(FileExistsError, match="already holds a complete checkpoint"):
        _save(io, tmp_path, Net(9), 1)
    assert open(os.path.join(path, "ema.safetensors"), "rb").read() == before
    # a directory without running_states.json is not a checkpoint
    half = tmp_path / "epoch0-global_step5"
    half.mkdir()
    (half / "ema.safetensors").write_bytes(before)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        io.load(None, str(half), ema=Net())
    with pytest.raises(FileExistsError, match="not a complete checkpoint"):
        _save(io, tmp_path, Net(9), 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(None, str(tmp_path / "nope"), ema=Net())


def test_sync_io_waits_and_next_save_waits(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    seen = []

    def hook(phase):
        seen.append(phase)
        if phase == "tensor" and not gate.is_set():
            gate.wait(5)

    monkeypatch.setattr(_ckpt_write, "phase_hook", hook)
    io = ckpt.CheckpointIO()
    path = _save(io, tmp_path, Net(1), 1)
    assert not os.path.exists(path)  # save returned while the writer is held
    gate.set()
    io._sync_io()
    assert os.path.isfile(os.path.join(path, "running_states.json")) and seen[-1] == "done"


def test_rm_checkpoints_keeps_latest_complete_only(tmp_path):
    io = ckpt.CheckpointIO(n_write_entries=4)
    paths = [_save(io, tmp_path, Net(s), s, async_io=False) for s in (1, 2, 3)]
    (tmp_path / "epoch0-global_step9").mkdir()  # incomplete: neither counted nor touched
    (tmp_path / "epoch0-global_step9" / "x").write_text("keep")
    (tmp_path / ".epoch0-global_step4.partial").mkdir()
    os.makedirs(os.path.join(paths[0], "eval"))
    ckpt.rm_checkpoints(str(tmp_path), keep_n_latest=2)
    assert os.listdir(paths[0]) == ["eval"]
    assert ckpt._is_complete(paths[1]) and ckpt._is_complete(paths[2])
    assert (tmp_path / "epoch0-global_step9" / "x").read_text() == "keep"
    ckpt.rm_checkpoints(str(tmp_path), keep_n_latest=0)  # upstream: <= 0 keeps everything
    assert ckpt._is_complete(paths[1])


def test_json_helpers(tmp_path):
    p = str(tmp_path / "a.json")
    ckpt.save_json({"a": [1, 2]}, p)
    assert ckpt.load_json(p) == {"a": [1, 2]} and not os.path.exists(p + ".tmp")


def test_progress_is_quiet_unless_a_tty_or_asked(monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY
    assert not ckpt._show_progress(None)
    assert ckpt._show_progress(True) and not ckpt._show_progress(False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert ckpt._show_progress(None)
    monkeypatch.setenv("OPENSORA_FAST_PROGRESS", "0")
    assert not ckpt._show_progress(None)
    # the writer's per-tensor bar does not change the file
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"osf_progress_{os.getpid()}.safetensors")
    try:
        ckpt._write_safetensors(path, {"a": torch.arange(4.0)}, show=True)
        assert torch.equal(load_file(path)["a"], torch.arange(4.0))
    finally:
        os.remove(path)


def test_tensornvme_writer_is_used_when_importable(tmp_path, monkeypatch):
    """With colossalai and tensornvme importable (faked here: neither installs
    beside this torch), each file goes through colossalai.utils.safetensors.save
    and its writer's synchronize(), before the checkpoint is renamed complete."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, path):
            self.path = path

        def synchronize(self):
            calls.append(("sync", os.path.basename(os.path.dirname(self.path)), os.path.basename(self.path)))

    def fake_save(path, state_dict):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
        calls.append(("save", os.path.basename(path)))
        return Writer(path)

    mods = {
        n: types.ModuleType(n)
        for n in (
            "colossalai",
            "colossalai.utils",
            "colossalai.utils.safetensors",
            "tensornvme",
            "tensornvme.async_file_io",
        )
    }
    mods["colossalai.utils.safetensors"].save = fake_save
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    io = ckpt.CheckpointIO()
    ema = Net(3)
    path = _save(io, tmp_path, ema, 5)
    io._sync_io()
    # written under the temporary name, synchronised, then renamed complete
    assert calls == [("save", "ema.safetensors"), ("sync", ".epoch0-global_step5.partial", "ema.safetensors")]
    assert ckpt._is_complete(path)
    got = load_file(os.path.join(path, "ema.safetensors"))
    for k, v in ema.state_dict().items():
        assert_bitwise_equal(got[k], v)

    # without tensornvme's AsyncFileWriter (the PyPI tensornvme), our writer runs
    monkeypatch.setitem(sys.modules, "tensornvme.async_file_io", None)
    calls.clear()
    path = _save(io, tmp_path, ema, 6)
    io._sync_io()
    assert calls == [] and ckpt._is_complete(path)
