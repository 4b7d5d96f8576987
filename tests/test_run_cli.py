"""``python -m opensora_fast run SCRIPT [ARGS...]`` (and under torchrun) against a
stand-in ``opensora`` package written to tmp_path, whose helpers raise when they
run: the user's unchanged script must get ours, also where upstream's own
CheckpointIO.save calls the gathers through its module."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STANDIN = {
    "opensora/__init__.py": "",
    "opensora/utils/__init__.py": "",
    "opensora/utils/train.py": """
        def update_ema(*a, **k):
            raise RuntimeError("upstream update_ema ran")
    """,
    "opensora/utils/ckpt.py": """
        def model_sharding(model, device=None):
            raise RuntimeError("upstream model_sharding ran")

        def model_gathering(model, model_shape_dict, pinned_state_dict):
            raise RuntimeError("upstream model_gathering ran")

        def master_weights_gathering(model, optimizer, pinned_state_dict):
            raise RuntimeError("upstream master_weights_gathering ran")

        def record_model_param_shape(model):
            return {n: p.shape for n, p in model.named_parameters()}

        class CheckpointIO:
            def save_ema(self, ema, ema_shape_dict, pinned):
                model_gathering(ema, ema_shape_dict, pinned)  # through the module, as upstream's save
    """,
}

SCRIPT = """
    import copy, json, os, sys
    import torch
    import torch.distributed as dist
    from opensora.utils.train import update_ema
    from opensora.utils.ckpt import CheckpointIO, model_sharding, record_model_param_shape

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    ema = copy.deepcopy(model).requires_grad_(False)
    shapes = record_model_param_shape(ema)
    model_sharding(ema)
    pinned = {n: torch.empty(s) for n, s in shapes.items()}
    CheckpointIO().save_ema(ema, shapes, pinned)
    gathered = rank != 0 or all(torch.equal(pinned[n], p.detach()) for n, p in model.named_parameters())
    whole = copy.deepcopy(model).requires_grad_(False)
    for p in whole.parameters():
        p.data.zero_()
    update_ema(whole, model, decay=0.5)
    ema_ok = all(torch.equal(e, 0.5 * p.detach()) for e, p in zip(whole.parameters(), model.parameters()))
    out = dict(argv=sys.argv, name=__name__, update_ema=update_ema.__module__, gathered=gathered, ema_ok=ema_ok,
               world=dist.get_world_size())
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    sys.exit(int(os.environ.get("SCRIPT_EXIT", "0")))
"""


@pytest.fixture
def standin(tmp_path):
    for rel, src in STANDIN.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    script = tmp_path / "scripts" / "train_like.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "pkg"), ROOT]))
    env.pop("RANK", None)
    return script, out, env


def _run(cmd, env, timeout=120):
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_run_patches_then_runs_the_script(standin):
    script, out, env = standin
    r = _run([sys.executable, "-m", "opensora_fast", "run", str(script), str(out), "a", "--flag", "-h"], env)
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "rank0.json").read_text())
    assert got["argv"] == [str(script), str(out), "a", "--flag", "-h"]  # the script's own arguments, -h included
    assert got["name"] == "__main__"
    assert got["update_ema"] == "opensora_fast.utils.train" and got["ema_ok"]
    assert got["gathered"]  # upstream's CheckpointIO reached our model_gathering (the stand-in's raises)
    assert "opensora_fast: patched" in r.stderr and "model_gathering" in r.stderr


def test_run_keeps_the_scripts_exit_status(standin):
    script, out, env = standin
    r = _run([sys.executable, "-m", "opensora_fast", "run", "-q", str(script), str(out)], dict(env, SCRIPT_EXIT="3"))
    assert r.returncode == 3, r.stderr
    assert "patched" not in r.stderr  # -q


def test_run_under_torchrun(standin):
    script, out, env = standin
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "opensora_fast",
            "run",
            str(script),
            str(out),
        ],
        env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((out / f"rank{rank}.json").read_text())
        assert got["world"] == 2 and got["update_ema"] == "opensora_fast.utils.train"
        assert got["gathered"] and got["ema_ok"]


def test_run_missing_script(tmp_path):
    r = _run([sys.executable, "-m", "opensora_fast", "run", str(tmp_path / "nope.py")], dict(os.environ))
    assert r.returncode == 2 and "no such script" in r.stderr
