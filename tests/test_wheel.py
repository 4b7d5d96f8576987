"""Wheels and the build/runtime check.

Fast (in `make test`): the import-time check that a build for another torch
major.minor or CUDA major fails with one clear error, tested by faking the recorded
build version (opensora_fast/_build_meta.py, written by setup.py).

Slow (`make test-wheel`): builds the wheel in a clean clone with tools/build_wheels.sh
(as `make wheels` does), installs it into a fresh virtual environment holding only
torch (plus the test tools), and runs the CPU test suite there against the installed
package, not the source tree; and the sdist, built and installed with
--no-build-isolation against the torch already in that environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import opensora_fast
from opensora_fast import _ext

ROOT = Path(__file__).resolve().parent.parent
PKG = Path(opensora_fast.__file__).resolve().parent


def _meta(torch_version, cuda_version, version="0.1.0+test"):
    return types.SimpleNamespace(VERSION=version, TORCH_VERSION=torch_version, CUDA_VERSION=cuda_version)


# ---------------------------------------------------------------- the mismatch check


@pytest.mark.parametrize(
    "built_torch, built_cuda, torch_version, torch_cuda",
    [
        ("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0"),
        ("2.14.0+cu130", "13.0", "2.14.1+cu130", "13.0"),  # patch releases share the ABI
        ("2.14.1+cu130", "13.0", "2.14.1+cu131", "13.1"),  # CUDA minor: same major
        ("2.14.1+cu130", None, "2.14.1", None),  # CPU kernels under a CPU torch
        ("2.14.1", None, "2.14.1+cu130", "13.0"),  # CPU kernels under a CUDA torch
    ],
)
def test_build_matches(built_torch, built_cuda, torch_version, torch_cuda):
    assert _ext.build_mismatch(_meta(built_torch, built_cuda), torch_version, torch_cuda) is None


@pytest.mark.parametrize(
    "built_torch, built_cuda, torch_version, torch_cuda, tag",
    [
        ("2.13.0+cu128", "12.8", "2.14.1+cu130", "13.0", "+cu130torch2.14"),  # both
        ("2.13.0+cu130", "13.0", "2.14.1+cu130", "13.0", "+cu130torch2.14"),  # torch minor
        ("2.14.1+cu128", "12.8", "2.14.1+cu130", "13.0", "+cu130torch2.14"),  # CUDA major
        ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, "+cputorch2.14"),  # CUDA build, CPU torch
        ("2.13.0", None, "2.14.1", None, "+cputorch2.14"),
    ],
)
def test_build_mismatch_message(built_torch, built_cuda, torch_version, torch_cuda, tag):
    msg = _ext.build_mismatch(_meta(built_torch, built_cuda), torch_version, torch_cuda)
    assert msg is not None
    assert f"built for torch {built_torch}" in msg  # both versions named
    assert f"this environment has torch {torch_version}" in msg
    if built_cuda:
        assert f"CUDA {built_cuda}" in msg
    if torch_cuda:
        assert f"CUDA {torch_cuda}" in msg
    assert tag in msg  # the build to install
    assert "pip install --no-build-isolation" in msg  # how to rebuild


def test_recorded_build_is_this_build():
    try:
        from opensora_fast import _build_meta
    except ImportError:
        pytest.skip("no opensora_fast/_build_meta.py (installed without the extension)")
    if not opensora_fast.HAS_NATIVE:
        pytest.skip("no extension")
    c = _ext._C.build_info()
    assert _build_meta.TORCH_VERSION == torch.__version__
    assert c["torch"] == _build_meta.TORCH_VERSION.replace("-", "_")
    assert bool(_build_meta.CUDA_VERSION) == bool(c["cuda_kernels"])
    assert _build_meta.VERSION.startswith(opensora_fast.__version__)


def _copy_with_fake_meta(tmp_path: Path, torch_version: str, cuda_version: str | None) -> Path:
    """A copy of the installed package (its real _C) whose recorded build is faked."""
    if not any(PKG.glob("_C*.so")):
        pytest.skip("opensora_fast._C is not built")
    dst = tmp_path / "site" / "opensora_fast"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "_build_meta.py").write_text(
        f"VERSION = '0.1.0+fake'\nTORCH_VERSION = {torch_version!r}\nTORCH_CUDA = {cuda_version!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\nCUDA_ARCHS = ''\nPYTHON = ''\n"
    )
    return dst.parent


def _import_in(site: Path, code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "OPENSORA_FAST_BACKEND"}
    full_env.update(env, PYTHONPATH=str(site))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=site,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_with_faked_build_version_fails_clearly(tmp_path):
    site = _copy_with_fake_meta(tmp_path, "2.13.0+cu128", "12.8")
    out = _import_in(site, "import opensora_fast")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "opensora_fast._ext.BuildMismatchError: opensora_fast 0.1.0+fake was built for torch 2.13.0+cu128 with CUDA 12.8"
    )
    assert f"this environment has torch {torch.__version__}" in last
    assert "pip install --no-build-isolation" in last
    assert out.stderr.count("Traceback") == 1 and "During handling" not in out.stderr, out.stderr  # one error
    assert "undefined symbol" not in out.stderr


def test_faked_mismatch_with_reference_backend_imports(tmp_path):
    site = _copy_with_fake_meta(tmp_path, "2.13.0+cu128", "12.8")
    out = _import_in(
        site,
        """
        import opensora_fast, torch
        from opensora_fast import _ext
        assert opensora_fast.__file__.startswith(%r), opensora_fast.__file__
        assert not opensora_fast.HAS_NATIVE
        err = opensora_fast.build_info()["import_error"]
        assert "built for torch 2.13.0+cu128" in err, err
        print("OK")
        """
        % str(site),
        OPENSORA_FAST_BACKEND="reference",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_faked_matching_version_loads(tmp_path):
    site = _copy_with_fake_meta(tmp_path, torch.__version__, torch.version.cuda if _cuda_kernels() else None)
    out = _import_in(site, "import opensora_fast; assert opensora_fast.HAS_NATIVE; print('OK')")
    assert out.returncode == 0, out.stderr[-3000:]


def _cuda_kernels() -> bool:
    return bool(opensora_fast.HAS_NATIVE and _ext._C.build_info().get("cuda_kernels"))


# ---------------------------------------------------------------- the wheel itself (slow)


def _run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}")
    return out


# Minutes and gigabytes (a torch install): only `make test-wheel` runs these.
wheel_test = pytest.mark.skipif(
    os.environ.get("OPENSORA_FAST_TEST_WHEEL") != "1",
    reason="slow: run by make test-wheel (OPENSORA_FAST_TEST_WHEEL=1)",
)

TEST_TOOLS = ["pytest", "numpy", "hypothesis", "av", "Pillow"]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A fresh virtual environment holding only torch (this one's version) and the
    test tools."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", *TEST_TOOLS], timeout=1800)
    return py


@pytest.fixture(scope="module")
def clean_clone(tmp_path_factory):
    src = tmp_path_factory.mktemp("clone") / "src"
    _run(["git", "clone", "-q", ROOT, src])
    return src


def _copy_suite(clone: Path, run_dir: Path) -> Path:
    """The clone's tests away from its package: tests/, benchmarks/ (tests/helpers.py
    imports benchmarks.layouts) and pyproject.toml (pytest's settings)."""
    shutil.copytree(clone / "tests", run_dir / "tests", ignore=shutil.ignore_patterns("test_wheel.py", "__pycache__"))
    shutil.copytree(
        clone / "benchmarks", run_dir / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__")
    )
    shutil.copy(clone / "pyproject.toml", run_dir / "pyproject.toml")
    return run_dir


def test_copied_suite_imports_without_the_source_tree(tmp_path):
    """The wheel run's copy of the suite collects where only the package is on the path."""
    run_dir = _copy_suite(ROOT, tmp_path / "run")
    site = tmp_path / "site"
    site.mkdir()
    (site / "opensora_fast").symlink_to(PKG, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENSORA_FAST_BACKEND")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_ema.py"],
        cwd=run_dir,
        env=dict(env, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _run_suite_against_installed(py: Path, clone: Path, tmp: Path):
    """The clone's tests, copied away from any source tree, run by the venv's python."""
    run_dir = _copy_suite(clone, tmp / "run")
    where = _run([py, "-c", "import opensora_fast; print(opensora_fast.__file__)"], cwd=run_dir).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(clone)), where
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENSORA_FAST_BACKEND")}
    out = subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
    return where


@pytest.mark.slow
@wheel_test
def test_wheel_from_clean_clone_in_fresh_venv(clean_clone, fresh_venv, tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _run(
        ["bash", clean_clone / "tools" / "build_wheels.sh", wheelhouse, sys.executable],
        cwd=clean_clone,
        env=env,
        timeout=5400,
    )
    wheels = sorted(wheelhouse.glob("*.whl"))
    assert len(wheels) == 1, wheels
    name = wheels[0].name
    cuda = "cu" + "".join(torch.version.cuda.split(".")[:2]) if torch.version.cuda else "cpu"
    torch_mm = ".".join(torch.__version__.split(".")[:2])
    pytag = "cp%d%d" % sys.version_info[:2]
    pattern = (
        rf"opensora_fast-{re.escape(opensora_fast.__version__)}\+({cuda}|cpu)torch{re.escape(torch_mm)}"
        rf"-{pytag}-{pytag}-manylinux_\d+_\d+_x86_64\.whl"
    )
    m = re.fullmatch(pattern, name)
    assert m, (name, pattern)
    tag = m.group(0).split("-")[1][len(opensora_fast.__version__) :]  # +cu130torch2.14
    _run([fresh_venv, "-m", "pip", "install", "-q", wheels[0]])  # and its dependencies (einops)
    show = _run([fresh_venv, "-m", "pip", "show", "opensora_fast"]).stdout
    assert f"Version: {opensora_fast.__version__}{tag}" in show, show
    _run_suite_against_installed(fresh_venv, clean_clone, tmp_path)


@pytest.mark.slow
@wheel_test
def test_sdist_builds_against_installed_torch(clean_clone, fresh_venv, tmp_path):
    """`make sdist`'s file, installed with --no-build-isolation into the fresh venv
    (CPU kernels only, to keep it short): tagged by that venv's torch."""
    dist = tmp_path / "dist"
    _run([sys.executable, "tools/sdist.py", dist], cwd=clean_clone)
    (sdist,) = dist.glob("opensora_fast-*.tar.gz")
    assert sdist.name == f"opensora_fast-{opensora_fast.__version__}.tar.gz"  # no local tag: built later
    _run([fresh_venv, "-m", "pip", "install", "-q", "setuptools>=64", "ninja", "einops>=0.6"])
    env = dict(os.environ, OPENSORA_FAST_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run(
        [fresh_venv, "-m", "pip", "install", "--no-build-isolation", "--no-deps", sdist],
        cwd=tmp_path,
        env=env,
        timeout=3600,
    )
    torch_mm = ".".join(torch.__version__.split(".")[:2])
    show = _run([fresh_venv, "-m", "pip", "show", "opensora_fast"]).stdout
    assert f"Version: {opensora_fast.__version__}+cputorch{torch_mm}" in show, show
    code = "import opensora_fast as o; i = o.build_info(); assert i['native'] and 'ema_update_' in str(i['ops']), i; print('OK')"
    out = _run([fresh_venv, "-c", code], cwd=tmp_path)
    assert out.stdout.strip() == "OK"
