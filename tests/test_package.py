"""Package-level behaviour: info CLI, the fallback without the extension."""

import json
import os
import subprocess
import sys
import textwrap

import torch


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_info_json():
    out = subprocess.run(
        [sys.executable, "-m", "opensora_fast", "info", "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    for key in ("version", "torch", "native", "cuda_kernels", "cuda_archs", "ops"):
        assert key in info, key
    assert info["native"] is True
    if torch.version.cuda:  # a CUDA torch with nvcc here builds the CUDA kernels
        assert info["cuda_kernels"] is True and info["cuda_archs"]
    text = subprocess.run([sys.executable, "-m", "opensora_fast", "info"], capture_output=True, text=True, check=True)
    assert "ema_update_" in text.stdout


_NO_EXT = """
import sys
sys.modules["opensora_fast._C"] = None  # as if built with OPENSORA_FAST_NO_EXT=1
import logging, torch
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
import opensora_fast
from opensora_fast import ops
assert not opensora_fast.HAS_NATIVE
"""


def test_fallback_without_extension_matches_upstream_and_says_so_once():
    r = run_py(
        _NO_EXT
        + """
g = torch.Generator().manual_seed(0)
ema = [torch.randn(n, generator=g).bfloat16() for n in (1, 3, 4099)]
src = [torch.randn(n, generator=g) for n in (1, 3, 4099)]
want = [e.clone() for e in ema]
for e, s in zip(want, src):
    e.mul_(0.99).add_(s, alpha=0.01)
ops.ema_update_(ema, src, 0.99)
ops.ema_update_([e.clone() for e in ema], src, 0.99)
assert all(torch.equal(a, b) for a, b in zip(ema, want))
print("info", opensora_fast.build_info()["native"])
"""
    )
    assert r.returncode == 0, r.stderr
    assert "info False" in r.stdout
    assert r.stderr.count("using the PyTorch reference") == 1, r.stderr


def test_backend_native_without_extension_is_an_error():
    r = run_py(
        _NO_EXT
        + """
try:
    ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9)
except RuntimeError as e:
    print("ERR", e)
""",
        OPENSORA_FAST_BACKEND="native",
    )
    assert r.returncode == 0, r.stderr
    assert "ERR OPENSORA_FAST_BACKEND=native" in r.stdout


def test_extension_loads_libstdcxx_shared():
    """_C must use the process's libstdc++: a static copy (what a g++ that finds no
    libstdc++.so links) makes every error an op raises crash Python or print garbage
    (seen on a GPU image). setup.py links the shared one and refuses such a build."""
    import re
    import shutil

    import pytest

    from opensora_fast._ext import HAS_NATIVE

    if not HAS_NATIVE:
        pytest.skip("no extension built (OPENSORA_FAST_NO_EXT)")
    import opensora_fast._C as C

    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to read _C's dynamic section"
    out = subprocess.run([readelf, "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    # and an op's error crosses into Python whole
    with pytest.raises(ValueError, match=r"^condition: z must be \[B, C, T, H, W\], got shape \[3, 4, 5, 6\]$"):
        torch.ops.opensora_fast.condition(torch.zeros(3, 4, 5, 6), [], [])
