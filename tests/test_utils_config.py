"""opensora_fast.utils.config: our mmengine-compatible loader (``_base_``, ``_delete_``),
merge_args, auto_convert, workspaces, aliases. Expected values follow upstream's
opensora/utils/config.py and mmengine's Config.fromfile merge rules."""

import ast
import json
import sys

import pytest

from opensora_fast.utils import config as C


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def cfg_tree(tmp_path):
    write(
        tmp_path / "base.py",
        "import os\n"
        "def helper():\n    return 1\n"
        "seed = 42\n"
        "dtype = 'bf16'\n"
        "model = dict(type='flux', depth=19, nested=dict(a=1, b=2), axes=[16, 56, 56])\n"
        "optim = dict(cls='HybridAdam', lr=1e-5, eps=1e-15)\n"
        "sampling_option = dict(resolution='256px', num_steps=50, guidance=7.5)\n"
        "plugin_config = dict(tp_size=1)\n",
    )
    write(tmp_path / "plugins" / "sp.py", "plugin = 'hybrid'\nplugin_config2 = dict(sp_size=8)\n")
    write(
        tmp_path / "child.py",
        "_base_ = ['base.py', 'plugins/sp.py']\n"
        "model = dict(depth=2, nested=dict(b=3, c=4))\n"
        "optim = dict(_delete_=True, cls='AdamW', lr=2e-4)\n"
        "sampling_option = dict(resolution='768px')\n"
        "extra = None\n",
    )
    write(tmp_path / "grandchild.py", "_base_ = 'child.py'\nseed = 7\nmodel = dict(axes=[1])\n")
    return tmp_path


def test_base_inheritance_and_delete(cfg_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)  # force our loader even if mmengine is around
    cfg = C.read_config(str(cfg_tree / "child.py"))
    assert isinstance(cfg, C.Config)
    assert cfg.to_dict() == {
        "seed": 42,
        "dtype": "bf16",
        # dicts merge recursively
        "model": {"type": "flux", "depth": 2, "nested": {"a": 1, "b": 3, "c": 4}, "axes": [16, 56, 56]},
        # _delete_ replaces the base dict and is itself dropped
        "optim": {"cls": "AdamW", "lr": 2e-4},
        "sampling_option": {"resolution": "768px", "num_steps": 50, "guidance": 7.5},
        "plugin_config": {"tp_size": 1},
        "plugin": "hybrid",
        "plugin_config2": {"sp_size": 8},
        "extra": None,
    }
    # attribute access, .get, nested ConfigDict
    assert cfg.model.nested.c == 4 and cfg.get("missing", 5) == 5 and cfg.sampling_option.guidance == 7.5
    assert cfg._filename == str(cfg_tree / "child.py") == cfg.filename
    with pytest.raises(AttributeError, match="'nope'"):
        _ = cfg.nope


def test_multilevel_base_and_list_replace(cfg_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)
    cfg = C.read_config(str(cfg_tree / "grandchild.py"))
    assert cfg.seed == 7
    assert cfg.model.axes == [1]  # lists replace (mmengine default)
    assert cfg.model.depth == 2 and cfg.optim.cls == "AdamW"


def test_base_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)
    write(tmp_path / "a.py", "x = 1\n")
    write(tmp_path / "b.py", "x = 2\n")
    write(tmp_path / "dup.py", "_base_ = ['a.py', 'b.py']\n")
    with pytest.raises(KeyError, match="Duplicate key"):
        C.read_config(str(tmp_path / "dup.py"))
    write(tmp_path / "typ.py", "_base_ = 'a.py'\nx = dict(y=1)\n")
    with pytest.raises(TypeError, match="_delete_"):
        C.read_config(str(tmp_path / "typ.py"))
    write(tmp_path / "c1.py", "_base_ = 'c2.py'\n")
    write(tmp_path / "c2.py", "_base_ = 'c1.py'\n")
    with pytest.raises(ValueError, match="circular"):
        C.read_config(str(tmp_path / "c1.py"))
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        C.read_config(str(tmp_path / "nothere.py"))


def test_read_config_prefers_mmengine(tmp_path, monkeypatch):
    import types

    calls = []
    fake_cfg_mod = types.ModuleType("mmengine.config")

    class FakeConfig:
        @staticmethod
        def fromfile(p):
            calls.append(p)
            return "mm"

    fake_cfg_mod.Config = FakeConfig
    monkeypatch.setitem(sys.modules, "mmengine", types.ModuleType("mmengine"))
    monkeypatch.setitem(sys.modules, "mmengine.config", fake_cfg_mod)
    assert C.read_config("x.py") == "mm" and calls == ["x.py"]


# ---------------------------------------------------------------- auto_convert


def ref_auto_convert(value):
    # port of upstream's auto_convert
    if value == "":
        return value
    if value.lower() == "none":
        return None
    if value.lower() == "true":
        return True
    if value.lower() == "false":
        return False
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return value


@pytest.mark.parametrize(
    "s",
    [
        "",
        "None",
        "NONE",
        "true",
        "False",
        "0",
        "-3",
        "1e-4",
        "3.5",
        "inf",
        "nan",
        "[1, 2]",
        "(1,)",
        "{'a': 1}",
        "'quoted'",
        "hello",
        "256px",
        "16:9",
        " 7 ",
        "1_000",
        "résumé",
        "[1, 2",
    ],
)
def test_auto_convert_matches_upstream(s):
    got, want = C.auto_convert(s), ref_auto_convert(s)
    if isinstance(want, float) and want != want:
        assert got != got
    else:
        assert got == want and type(got) is type(want)


# ---------------------------------------------------------------- merge_args


def base_cfg():
    return C.Config(
        dict(
            seed=42,
            lr=1e-4,
            name="x",
            flag=False,
            ckpt=None,
            axes=[16, 56, 56],
            model=dict(depth=19, sub=dict(width=3), scale=1.0),
        ),
        filename="configs/diffusion/train/stage1.py",
    )


def test_merge_args_types_like_upstream():
    cfg = C.merge_args(
        base_cfg(),
        [
            "--seed",
            "7",
            "--lr",
            "3",
            "--name",
            "12",
            "--flag",
            "True",
            "--new-key",
            "1.5",
            "--model.depth",
            "2",
            "--model.scale",
            "3",
            "--model.sub.width",
            "none",
        ],
    )
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert cfg.lr == 3.0 and type(cfg.lr) is float  # cast to the existing type
    assert cfg.name == "12" and type(cfg.name) is str
    assert cfg.flag is True
    assert cfg.new_key == 1.5  # '-' -> '_', new keys auto-converted
    assert cfg.model.depth == 2
    assert cfg.model.scale == 3 and type(cfg.model.scale) is int  # nested keys: auto_convert, as upstream
    assert cfg.model.sub.width is None


def test_merge_args_none_current_value():
    # upstream: type(None)("path") -> TypeError
    cfg = C.merge_args(base_cfg(), ["--ckpt", "ckpts/a.safetensors", "--seed", "None"])
    assert cfg.ckpt == "ckpts/a.safetensors" and cfg.seed is None
    cfg = C.merge_args(cfg, ["--seed", "3"])
    assert cfg.seed == 3


def test_merge_args_list_value_parsed():
    cfg = C.merge_args(base_cfg(), ["--axes", "[1, 2]"])
    assert cfg.axes == [1, 2]


def test_merge_args_bad_input():
    with pytest.raises(KeyError) as e:
        C.merge_args(base_cfg(), ["--nope.x", "1"])
    assert "'nope'" in str(e.value) and "model" in str(e.value)
    with pytest.raises(KeyError, match="'deep'"):
        C.merge_args(base_cfg(), ["--model.deep.x", "1"])
    with pytest.raises(ValueError, match="'seed'"):
        C.merge_args(base_cfg(), ["seed", "1"])
    with pytest.raises(ValueError, match="pairs"):
        C.merge_args(base_cfg(), ["--seed"])
    assert C.merge_args(base_cfg(), []) == base_cfg()


def test_parse_args_and_parse_configs(cfg_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)
    monkeypatch.setenv("AE_SPATIAL_COMPRESSION", "16")  # recorded, so teardown restores the original state
    (cfg_tree / "ae.py").write_text("_base_ = 'base.py'\nae_spatial_compression = 32\n")
    path = str(cfg_tree / "ae.py")
    monkeypatch.setattr(sys, "argv", ["train.py", path, "--seed", "1", "--model.depth", "4"])
    assert C.parse_args() == (path, ["--seed", "1", "--model.depth", "4"])
    cfg = C.parse_configs()
    assert cfg.seed == 1 and cfg.model.depth == 4 and cfg.config_path == path
    import os

    assert os.environ["AE_SPATIAL_COMPRESSION"] == "32"  # monkeypatch's teardown removes it again


# ---------------------------------------------------------------- names, workspace, aliases


@pytest.mark.parametrize(
    "fn,want",
    [
        ("configs/diffusion/train/stage1.py", "diffusion_train_stage1"),
        ("configs/vae/train/video_dc_ae.py", "vae_train_video_dc_ae"),
        ("my.pyconfigs/x.py", "myx"),  # upstream removes every ".py" and "configs/"
    ],
)
def test_config_to_name(fn, want):
    assert C.config_to_name(C.Config({}, filename=fn)) == want


def test_create_experiment_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    name, d = C.create_experiment_workspace(str(tmp_path), model_name="a/b", config={"x": [1, 2]})
    stamp, _, model = name.partition("-")
    assert model == "a-b" and len(stamp) == 13 and stamp[6] == "_" and stamp.replace("_", "").isdigit()
    assert d == f"{tmp_path}/{name}"
    assert json.loads((tmp_path / name / "config.txt").read_text()) == {"x": [1, 2]}
    name, d = C.create_experiment_workspace(str(tmp_path), exp_name="fixed", config=None)
    assert name == "fixed" and (tmp_path / "fixed" / "config.txt").read_text() == "null"
    name, _ = C.create_experiment_workspace(str(tmp_path), config={})
    assert "-" not in name


def test_sync_string_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert C.sync_string("abc") == "abc"


def test_parse_alias():
    cfg = C.Config(
        dict(
            resolution="768px",
            guidance="5",
            guidance_img=2,
            num_steps="30",
            num_frames=33.0,
            aspect_ratio="9:16",
            ckpt_path="c.safetensors",
            sampling_option=dict(resolution="256px"),
            model=dict(from_pretrained="a"),
        ),
    )
    out = C.parse_alias(cfg)
    assert out is cfg
    so = cfg.sampling_option
    assert so.resolution == "768px" and so.aspect_ratio == "9:16"
    assert so.guidance == 5.0 and type(so.guidance) is float
    assert so.guidance_img == 2.0 and type(so.guidance_img) is float
    assert so.num_steps == 30 and so.num_frames == 33 and type(so.num_frames) is int
    assert cfg.model.from_pretrained == "c.safetensors"
    # None aliases do nothing
    cfg2 = C.Config(dict(guidance=None, sampling_option=dict(guidance=1.0)))
    assert C.parse_alias(cfg2).sampling_option.guidance == 1.0
    with pytest.raises(KeyError, match="sampling_option"):
        C.parse_alias(C.Config(dict(num_steps=3)))


def test_configdict_behaviour():
    d = C.ConfigDict(a=dict(b=[dict(c=1)]))
    assert d.a.b[0].c == 1
    d.x = dict(y=2)
    assert d.x.y == 2 and isinstance(d.x, C.ConfigDict)
    import copy
    import pickle

    assert copy.deepcopy(d) == d and pickle.loads(pickle.dumps(d)) == d
    cfg = C.Config(dict(a=1), filename="f.py")
    c2 = pickle.loads(pickle.dumps(cfg))
    assert c2 == cfg and c2._filename == "f.py" and copy.deepcopy(cfg)._filename == "f.py"
