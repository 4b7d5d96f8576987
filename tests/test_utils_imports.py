"""Every module imports with none of the optional extras installed (checked in a
subprocess that blocks them), the errors that name the extra, and opensora_fast.utils.cai."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist

from opensora_fast.utils import cai as CAI
from opensora_fast.utils import misc as M

BLOCKED = ["colossalai", "mmengine", "tensornvme", "openai", "av", "PIL", "tensorboard", "psutil", "tqdm"]
MODULES = [
    "opensora_fast",
    "opensora_fast.utils",
    "opensora_fast.utils.train",
    "opensora_fast.utils.inference",
    "opensora_fast.utils.optimizer",
    "opensora_fast.utils.misc",
    "opensora_fast.utils.logger",
    "opensora_fast.utils.config",
    "opensora_fast.utils.sampling",
    "opensora_fast.utils.cai",
    "opensora_fast.utils.prompt_refine",
    "opensora_fast.datasets",
    "opensora_fast.datasets.aspect",
    "opensora_fast.datasets.utils",
]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, os, sys, tempfile
    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked optional dependency: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    for name in {modules!r}:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked

    import torch
    from opensora_fast import patch_opensora
    from opensora_fast.datasets import save_sample
    from opensora_fast.utils import config, misc, optimizer, prompt_refine, train

    # things that need no extra work
    assert misc.format_duration(3661) == "1h 1m 1s"
    assert misc.get_process_mem() > 0 and misc.get_total_mem() > 0  # /proc fallback without psutil
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "b.py"), "w") as f:
        f.write("x = dict(a=1)\\n")
    with open(os.path.join(d, "c.py"), "w") as f:
        f.write("_base_ = 'b.py'\\nx = dict(b=2)\\n")
    assert config.read_config(os.path.join(d, "c.py")).x == dict(a=1, b=2)
    assert prompt_refine.refine_prompt("keep me") == "keep me"
    train.warmup_ae(type("AE", (), {{"encode": lambda self, x: x}})(), [(1, 2)], "cpu", torch.float32)
    assert patch_opensora() == []

    # things that do: a clear error naming the extra
    def err(fn):
        try:
            fn()
        except ImportError as e:
            return str(e)
        raise AssertionError("no ImportError")

    assert "opensora_fast[video]" in err(lambda: save_sample(torch.zeros(3, 1, 4, 4), os.path.join(d, "x")))
    assert "opensora_fast[video]" in err(lambda: save_sample(torch.zeros(3, 2, 4, 4), os.path.join(d, "x")))
    assert "opensora_fast[tensorboard]" in err(lambda: misc.create_tensorboard_writer(d))
    assert "opensora_fast[colossalai]" in err(lambda: optimizer.create_optimizer(torch.nn.Linear(1, 1), {{}}))
    assert "opensora_fast[colossalai]" in err(lambda: train.create_colossalai_plugin("zero2", "bf16", 1.0))
    print("OK")
    """
)


def test_every_module_imports_without_optional_extras(tmp_path):
    import os

    script = tmp_path / "check.py"
    script.write_text(SCRIPT.format(blocked=BLOCKED, modules=MODULES))
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    env.pop("WORLD_SIZE", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


# ---------------------------------------------------------------- cai


def test_set_group_size(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = {"tp_size": "8"}
    with caplog.at_level(logging.INFO):
        CAI.set_group_size(cfg)
    assert cfg == {"tp_size": 4} and "Using TP with size 4" in caplog.text
    cfg = {"sp_size": 2, "tp_size": 1}
    CAI.set_group_size(cfg)
    assert cfg == {"sp_size": 2, "tp_size": 1}
    cfg = {}
    CAI.set_group_size(cfg)
    assert cfg == {}
    with pytest.raises(ValueError, match="tp_size=2, sp_size=2"):
        CAI.set_group_size({"tp_size": 2, "sp_size": 2})


def test_init_inference_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert CAI.init_inference_environment() is None  # not distributed: nothing to do
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "colossalai", None)
    with pytest.raises(ImportError, match=r"opensora_fast\[colossalai\]"):
        CAI.init_inference_environment()


def test_get_booster(monkeypatch):
    assert CAI.get_booster({}) is None  # zero2 default: no booster, as upstream
    assert CAI.get_booster({"plugin_ae": "zero1"}, ae=True) is None
    with pytest.raises(ValueError) as e:
        CAI.get_booster({"plugin": "hybird"})
    assert "'hybird'" in str(e.value) and "hybrid" in str(e.value)
    monkeypatch.setitem(sys.modules, "colossalai", None)
    with pytest.raises(ImportError, match=r"opensora_fast\[colossalai\]"):
        CAI.get_booster({"plugin": "hybrid", "plugin_config": {"tp_size": 1}})


def test_get_booster_with_fake_colossalai(monkeypatch):
    from opensora_fast.utils import train as T

    made = {}

    class Booster:
        def __init__(self, plugin):
            self.plugin = plugin

    booster_mod = types.ModuleType("colossalai.booster")
    booster_mod.Booster = Booster
    monkeypatch.setitem(sys.modules, "colossalai", types.ModuleType("colossalai"))
    monkeypatch.setitem(sys.modules, "colossalai.booster", booster_mod)
    monkeypatch.setattr(T, "create_colossalai_plugin", lambda **kw: made.update(kw) or "plugin")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    class Policy:
        pass

    b = CAI.get_booster(
        {"plugin_ae": "hybrid", "plugin_config_ae": {"tp_size": 8, "pp_size": 1}, "dtype": "fp16"},
        ae=True,
        policy=Policy,
    )
    assert isinstance(b, Booster) and b.plugin == "plugin"
    assert made == dict(plugin="hybrid", dtype="fp16", grad_clip=0, tp_size=2, pp_size=1, custom_policy=Policy)
    # without Open-Sora installed the default policy cannot be found: a clear error
    monkeypatch.setitem(sys.modules, "opensora", None)
    with pytest.raises(ImportError, match="policy"):
        CAI.get_booster({"plugin": "hybrid"})


def test_get_is_saving_process(monkeypatch):
    assert CAI.get_is_saving_process({}) is True
    assert CAI.get_is_saving_process({"plugin": "zero1"}) is True
    ranks = {"tp": 0, "sp": 1}
    monkeypatch.setattr(M, "_GROUPS", {"tensor": "tp", "sequence": "sp"})
    monkeypatch.setattr(dist, "get_rank", lambda group=None: ranks[group])
    assert CAI.get_is_saving_process({"plugin": "hybrid", "plugin_config": {"tp_size": 2, "sp_size": 1}}) is True
    assert CAI.get_is_saving_process({"plugin": "hybrid", "plugin_config": {"tp_size": 1, "sp_size": 2}}) is False
    ranks["sp"] = 0
    assert CAI.get_is_saving_process({"plugin": "hybrid", "plugin_config": {"sp_size": 2}}) is True
    assert CAI.get_is_saving_process({"plugin": "hybrid", "plugin_config": {}}) is False


def test_parallel_group_registry_follows_upstream_when_loaded(monkeypatch):
    store = {}
    up = types.ModuleType("opensora.acceleration.parallel_states")
    up.set_data_parallel_group = lambda g: store.__setitem__("data", g)
    up.get_data_parallel_group = lambda: store.get("data", "WORLD")
    up.set_sequence_parallel_group = lambda g: store.__setitem__("sequence", g)
    up.get_sequence_parallel_group = lambda: store.get("sequence")
    up.set_tensor_parallel_group = lambda g: store.__setitem__("tensor", g)
    up.get_tensor_parallel_group = lambda: store.get("tensor")
    monkeypatch.setattr(M, "_GROUPS", {})
    monkeypatch.setitem(sys.modules, "opensora.acceleration.parallel_states", up)
    assert M.get_data_parallel_group() == "WORLD"
    M.set_data_parallel_group("dp")
    M.set_tensor_parallel_group("tp")
    M.set_sequence_parallel_group("sp")
    assert store == {"data": "dp", "tensor": "tp", "sequence": "sp"}
    store["data"] = "set-by-upstream"
    assert M.get_data_parallel_group() == "set-by-upstream"
    monkeypatch.delitem(sys.modules, "opensora.acceleration.parallel_states")
    assert M.get_data_parallel_group() == "dp" and M.get_sequence_parallel_group() == "sp"
