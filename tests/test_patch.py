"""patch_opensora() / unpatch_opensora() against a small fake ``opensora`` package
written to a temporary directory (sys.modules is restored afterwards)."""

import sys
import textwrap
import types

import pytest

import opensora_fast
from opensora_fast.utils import misc as our_misc
from opensora_fast.utils import train as our_train

FILES = {
    "opensora/__init__.py": "",
    "opensora/utils/__init__.py": "",
    "opensora/utils/train.py": """
        def update_ema(*a, **k):
            return "upstream update_ema"

        def get_batch_loss(*a, **k):
            return "upstream get_batch_loss"

        def set_lr(*a, **k):
            return "upstream set_lr"
    """,
    "opensora/utils/misc.py": """
        def format_duration(seconds):
            return "upstream"
    """,
    # an upstream module whose own dependency is missing
    "opensora/utils/config.py": "import mmengine_is_not_installed_here\n",
    # a module that imported the functions before the patch
    "opensora/scripts_like.py": """
        from opensora.utils.train import update_ema
        from opensora.utils.train import get_batch_loss as loss_fn
        from opensora.utils.misc import format_duration as fd
        from opensora.utils import train as train_mod
    """,
}


@pytest.fixture
def fake_opensora(tmp_path, monkeypatch):
    opensora_fast.unpatch_opensora()  # forget patches other tests left behind
    for rel, src in FILES.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "opensora" or m.startswith("opensora.")]:
        monkeypatch.delitem(sys.modules, name)
    fake_main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    yield fake_main
    opensora_fast.unpatch_opensora()
    for name in set(sys.modules) - before:
        if name == "opensora" or name.startswith("opensora."):
            del sys.modules[name]


def test_patch_and_unpatch_round_trip(fake_opensora):
    import opensora.scripts_like as s
    import opensora.utils.misc as up_misc
    import opensora.utils.train as up_train

    originals = (up_train.update_ema, up_train.get_batch_loss, up_train.set_lr, up_misc.format_duration)
    fake_opensora.update_ema = up_train.update_ema  # a script's `from opensora.utils.train import update_ema`

    patched = opensora_fast.patch_opensora()
    assert sorted(patched) == sorted(
        [
            "opensora.utils.train.update_ema",
            "opensora.utils.train.get_batch_loss",
            "opensora.scripts_like.update_ema",
            "opensora.scripts_like.loss_fn",
            "__main__.update_ema",
        ]
    )
    assert up_train.update_ema is our_train.update_ema and up_train.get_batch_loss is our_train.get_batch_loss
    assert s.update_ema is our_train.update_ema and s.loss_fn is our_train.get_batch_loss
    assert fake_opensora.update_ema is our_train.update_ema
    assert s.train_mod is up_train  # modules are not touched
    # the plain ports are left alone by default
    assert up_train.set_lr is originals[2] and s.fd is originals[3]
    # code importing after the patch gets ours
    from opensora.utils.train import update_ema

    assert update_ema is our_train.update_ema

    # calling again changes nothing
    assert opensora_fast.patch_opensora() == []
    assert s.update_ema is our_train.update_ema

    restored = opensora_fast.unpatch_opensora()
    assert sorted(restored) == sorted(patched)
    assert (up_train.update_ema, up_train.get_batch_loss, up_train.set_lr, up_misc.format_duration) == originals
    assert s.update_ema is originals[0] and s.loss_fn is originals[1] and fake_opensora.update_ema is originals[0]
    assert opensora_fast.unpatch_opensora() == []


def test_patch_ports_and_unimportable_modules(fake_opensora):
    import opensora.scripts_like as s
    import opensora.utils.misc as up_misc
    import opensora.utils.train as up_train

    orig_fd, orig_set_lr = up_misc.format_duration, up_train.set_lr
    patched = opensora_fast.patch_opensora(ports=True)
    assert "opensora.utils.misc.format_duration" in patched and "opensora.scripts_like.fd" in patched
    assert "opensora.utils.train.set_lr" in patched
    assert up_misc.format_duration is our_misc.format_duration and s.fd is our_misc.format_duration
    assert up_train.set_lr is our_train.set_lr
    # opensora.utils.config failed to import (its dependency is missing): skipped
    assert not any(p.startswith("opensora.utils.config") for p in patched)
    # names the installed module lacks are not added
    assert not hasattr(up_misc, "to_torch_dtype")
    opensora_fast.unpatch_opensora()
    assert up_misc.format_duration is orig_fd and s.fd is orig_fd and up_train.set_lr is orig_set_lr
    # strict: the first row whose module does not import raises (the fake has no inference module)
    with pytest.raises(ImportError, match="opensora.utils.inference"):
        opensora_fast.patch_opensora(ports=True, strict=True)
    opensora_fast.unpatch_opensora()
    with pytest.raises(ImportError, match="opensora.utils.inference"):  # an accelerated row too
        opensora_fast.patch_opensora(strict=True)
    opensora_fast.unpatch_opensora()
    assert "opensora.utils.train.update_ema" in opensora_fast.patch_opensora()
    opensora_fast.unpatch_opensora()


def test_unpatch_leaves_later_changes_alone(fake_opensora):
    import opensora.utils.train as up_train

    original = up_train.update_ema
    opensora_fast.patch_opensora()
    mine = lambda *a: "user's own"  # noqa: E731
    up_train.update_ema = mine
    restored = opensora_fast.unpatch_opensora()
    assert "opensora.utils.train.update_ema" not in restored
    assert up_train.update_ema is mine and up_train.get_batch_loss is not our_train.get_batch_loss
    assert original is not mine


def test_patch_without_opensora(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensora", None)
    assert opensora_fast.patch_opensora(ports=True) == []
    with pytest.raises(ImportError):
        opensora_fast.patch_opensora(strict=True)


def test_table_rows_name_real_functions():
    import importlib

    for table in (opensora_fast._DROP_INS, opensora_fast._PORTS):
        for upstream, (ours, names) in table.items():
            assert upstream.startswith("opensora.utils.")
            mod = importlib.import_module(ours)
            for name in names:
                assert callable(getattr(mod, name)), f"{ours}.{name}"


UPSTREAM_CKPT = """
    CALLS = []

    def model_sharding(model, device=None):
        CALLS.append("model_sharding")

    def model_gathering(model, model_shape_dict, pinned_state_dict):
        CALLS.append("model_gathering")

    def master_weights_gathering(model, optimizer, pinned_state_dict):
        CALLS.append("master_weights_gathering")

    def remove_padding(tensor, original_shape):
        return "upstream remove_padding"

    class CheckpointIO:
        # as upstream's save: the gathers looked up in this module at call time
        def save(self, model, ema, optimizer, ema_shape_dict, pinned, master_pinned):
            master_weights_gathering(model, optimizer, master_pinned)
            model_gathering(ema, ema_shape_dict, pinned)
"""


def test_default_patch_replaces_the_checkpoint_gathers(fake_opensora, tmp_path):
    """A plain patch_opensora() swaps model_sharding / model_gathering /
    master_weights_gathering (not only with ports=True), and upstream's
    CheckpointIO.save, calling them through its module, then runs ours."""
    from opensora_fast.utils import ckpt as our_ckpt

    (tmp_path / "opensora/utils/ckpt.py").write_text(textwrap.dedent(UPSTREAM_CKPT))
    import opensora.utils.ckpt as up_ckpt

    original = up_ckpt.model_gathering
    patched = opensora_fast.patch_opensora()
    for name in ("model_sharding", "model_gathering", "master_weights_gathering"):
        assert f"opensora.utils.ckpt.{name}" in patched
        assert getattr(up_ckpt, name) is getattr(our_ckpt, name)
    assert up_ckpt.remove_padding(None, ()) == "upstream remove_padding"  # a plain port: ports=True only
    save_globals = up_ckpt.CheckpointIO.save.__globals__
    assert save_globals["model_gathering"] is our_ckpt.model_gathering
    assert save_globals["master_weights_gathering"] is our_ckpt.master_weights_gathering
    opensora_fast.unpatch_opensora()
    assert up_ckpt.model_gathering is original
    up_ckpt.CheckpointIO().save(None, None, None, None, None, None)
    assert up_ckpt.CALLS == ["master_weights_gathering", "model_gathering"]
