"""``python -m opensora_fast demo``: the tiny size as a smoke test (both runs
agree, the JSON holds every phase, the chart is a real PNG, a sample is saved),
and bad input refused before anything is written."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from opensora_fast.__main__ import main as cli_main
from opensora_fast.demo import report
from opensora_fast.demo.loop import PHASES, UTILITY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "opensora_fast",
            "demo",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r, out


def test_tiny_demo_runs_and_both_sides_agree(tiny_run):
    r, out = tiny_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = glob.glob(str(out / "demo-*.json"))
    doc = json.loads(open(path).read())
    assert doc["machine"] and doc["torch"] == torch.__version__ and "native" in json.dumps(doc["build"])
    assert list(doc["runs"])[:2] == ["upstream", "fast"]
    for run in doc["runs"].values():
        for phase in PHASES + ("background", "drain", "sample_condition", "sample_denoise"):
            assert phase in run["phases"], phase
        for phase in ("condition", "forward", "loss", "backward", "optimizer", "ema"):
            assert run["phases"][phase]["calls"] >= 1 and run["phases"][phase]["median_ms"] > 0
        assert run["phases"]["checkpoint"]["calls"] == run["saves"] == 2  # 6 steps, every 3
        assert len(run["losses"]) == 6 and run["peak_memory_bytes"] > 0
    up, fast = doc["runs"]["upstream"], doc["runs"]["fast"]
    agree = doc["agreement"]["fast"]
    assert agree["ok"]
    assert abs(up["final_loss"] - fast["final_loss"]) <= report.LOSS_RTOL * abs(up["final_loss"])
    assert abs(up["ema_checksum"]["sum"] - fast["ema_checksum"]["sum"]) <= (
        report.EMA_RTOL * up["ema_checksum"]["abs_sum"]
    )
    assert up["ema_checksum"]["abs_sum"] > 0
    for key in ("utility", "step", "checkpoint", "ema", "loss", "condition"):
        assert key in doc["speedups"]["fast"]
    assert doc["utility_phases"] == list(UTILITY) and doc["goal"]["target"] == 3.0
    # the printed table names every phase and states the goal with the measured figure
    for phase in (
        "condition",
        "forward+loss",
        "backward",
        "optimizer",
        "ema",
        "checkpoint",
        "peak memory",
        "final loss",
        "EMA checksum",
    ):
        assert phase in r.stdout, phase
    assert "Goal:" in r.stdout and ("MET" in r.stdout) and "measured here" in r.stdout
    assert "fused optimizer" in r.stdout or "fused" in doc["runs"]


def test_tiny_demo_writes_a_chart_and_a_sample(tiny_run):
    from PIL import Image

    r, out = tiny_run
    (png,) = glob.glob(str(out / "demo-*.png"))
    assert os.path.getsize(png) > 20_000
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank image
    samples = glob.glob(str(out / "demo-*-sample*"))
    assert len(samples) == 1
    if samples[0].endswith(".mp4"):
        assert os.path.getsize(samples[0]) > 1000 and "mp4" in r.stdout
    else:
        assert os.listdir(samples[0]) and "PNG frames" in r.stdout
    leftovers = [f for f in os.listdir(out) if f.startswith(".")]
    assert not leftovers  # no temporary files


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--steps", "0"], "must be a positive integer"),
        (["--steps", "two"], "must be a positive integer"),
        (["--device", "mps"], "the demo runs on cpu or cuda only"),
        (["--device", "not-a-device"], "is not a device"),
        (["--device", "cuda:99"], "cuda:99"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--out", str(out), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, not even the directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--size", "tiny", "--out", str(blocker / "sub")])
    assert e.value.code == 2 and "cannot write there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["demo", "--size", "tiny", "--out", str(blocker)])
    assert "is not a directory" in capsys.readouterr().err


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_dump(obj, f, **kw):
        f.write('{"half": ')
        raise OSError("disk full")

    monkeypatch.setattr(report.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        report.write_json({"a": 1}, str(tmp_path / "demo-x.json"))
    assert os.listdir(tmp_path) == []


def test_the_package_does_not_need_matplotlib():
    code = (
        "import sys, opensora_fast, opensora_fast.__main__, opensora_fast.demo.cli, opensora_fast.demo.loop, "
        "opensora_fast.demo.report; assert 'matplotlib' not in sys.modules, 'imported eagerly'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
