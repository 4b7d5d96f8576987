"""Package-level behaviour: info CLI, the fallback without the extension, the CUDA
arch list and what ``info`` says of it, the private test switches (CPU ISA variant,
small launch tables) and their environment variables, a CUDA kernel for every op."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import CPU_ISAS, needs_native, skip_without_native, supported_isas

import opensora_fast
from opensora_fast import _ext, build_info
from opensora_fast.__main__ import main as cli_main

OP = torch.ops.opensora_fast
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
""",
        OPENSORA_FAST_BACKEND="auto",  # the fallback under test, whatever the tests start from
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
    import shutil

    if not _ext.HAS_NATIVE:
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


# ---- the CPU ISA switch (csrc/cpu_isa.h: baseline, AVX2, AVX-512, chosen at run time) ----


@needs_native
def test_switch_returns_previous_and_refuses_bad_names():
    prev = OP._cpu_isa()
    assert prev in CPU_ISAS and build_info()["cpu_isa"] == prev
    assert OP._cpu_isa("baseline") == prev
    try:
        assert OP._cpu_isa() == "baseline" and build_info()["cpu_isa"] == "baseline"
        with pytest.raises(ValueError, match="isa must be 'baseline', 'avx2' or 'avx512', got 'sse9'"):
            OP._cpu_isa("sse9")
        assert OP._cpu_isa() == "baseline"  # unchanged by the refusal
    finally:
        OP._cpu_isa(prev)
    if prev != "avx512":
        with pytest.raises(ValueError, match="this CPU runs at most"):
            OP._cpu_isa("avx512")


@needs_native
def test_environment_variable_lowers_the_variant():
    code = "import opensora_fast; print(opensora_fast.build_info()['cpu_isa'])"
    for want in ("baseline", "bogus"):
        env = dict(os.environ, OPENSORA_FAST_CPU_ISA=want)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        # an unknown value is ignored: the widest variant
        assert out.stdout.split()[-1] == (want if want != "bogus" else supported_isas()[-1])


# ---- the CUDA arch list and info ---------------------------------------------------------


def _arch_key(a: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)", a)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def test_default_arch_list_carries_ptx_for_its_newest_arch():
    # SASS only (the old "8.0;9.0") fails on Blackwell with "no kernel image";
    # PTX of the newest arch is JIT-compiled by newer GPUs.
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = re.search(r"^export TORCH_CUDA_ARCH_LIST \?= (\S+)$", f.read(), re.M).group(1)
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    setup_default = re.search(r'^DEFAULT_CUDA_ARCHS = "([^"]+)"', text, re.M).group(1)
    assert 'setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)' in text
    assert make == setup_default
    archs = setup_default.split(";")
    newest = max(archs, key=lambda a: _arch_key(a))
    assert newest.endswith("+PTX"), setup_default


def _expected_sass_ptx(archs: str) -> tuple[str, str]:
    """From torch's own -gencode flags for ``archs`` (the build's source of truth)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        flags = _get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    codes = [c for f in flags for m in re.findall(r",code=\[?([\w,]+)", f) for c in m.split(",")]

    def arch(c: str) -> str:
        d = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", c)
        return f"{d.group(1)}.{d.group(2)}{d.group(3)}"

    def join(prefix: str) -> str:
        return ";".join(sorted({arch(c) for c in codes if c.startswith(prefix)}, key=_arch_key))

    return join("sm_"), join("compute_")


def test_info_names_the_archs_with_sass_and_with_ptx(capsys):
    skip_without_native()
    assert cli_main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert cli_main(["info"]) == 0
    lines = {}
    for ln in capsys.readouterr().out.splitlines():
        key, _, value = ln.partition(" ")
        lines[key] = value.strip()
    if not data["cuda_kernels"]:
        assert data["cuda_sass"] == data["cuda_ptx"] == ""
        return
    want = _expected_sass_ptx(data["cuda_archs"])
    assert (data["cuda_sass"], data["cuda_ptx"]) == want, data["cuda_archs"]
    assert want[0]  # every build carries machine code for some arch
    assert lines["cuda_sass"] == want[0] and lines["cuda_ptx"] == want[1]


def test_arch_code_is_unknown_for_a_record_of_another_build(monkeypatch):
    class Meta:
        CUDA_ARCHS, CUDA_SASS, CUDA_PTX = "8.0;9.0+PTX", "8.0;9.0", "9.0"

    monkeypatch.setitem(sys.modules, "opensora_fast._build_meta", Meta)
    monkeypatch.setattr(opensora_fast, "_build_meta", Meta, raising=False)
    assert _ext._arch_code("8.0;9.0+PTX") == {"cuda_sass": "8.0;9.0", "cuda_ptx": "9.0"}
    assert _ext._arch_code("8.0_9.0+PTX") == {"cuda_sass": "8.0;9.0", "cuda_ptx": "9.0"}  # _C's separators
    assert _ext._arch_code("9.0") == {"cuda_sass": "?", "cuda_ptx": "?"}
    assert _ext._arch_code("") == {"cuda_sass": "", "cuda_ptx": ""}


# ---- the small-table switch from the environment -------------------------------------------


def test_env_flag_values(monkeypatch):
    for raw, want in (("", False), ("0", False), ("off", False), ("1", True), (" TRUE ", True), ("yes", True)):
        monkeypatch.setenv("OSF_TEST_FLAG", raw)
        assert _ext._env_flag("OSF_TEST_FLAG") is want, raw
    monkeypatch.setenv("OSF_TEST_FLAG", "2")
    with pytest.raises(ValueError, match="OSF_TEST_FLAG must be 0 or 1"):
        _ext._env_flag("OSF_TEST_FLAG")


def _import_and_read_switch(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENSORA_FAST_FORCE_SMALL_TABLES=value)
    env.pop("OPENSORA_FAST_BACKEND", None)
    code = "import torch, opensora_fast; print(torch.ops.opensora_fast._force_small_tables(False))"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_force_small_tables_from_the_environment_at_import():
    skip_without_native()
    # in this process: as the environment says (gpu_check.sh runs the CUDA tests with it set)
    here = _ext._env_flag("OPENSORA_FAST_FORCE_SMALL_TABLES")
    prev = OP._force_small_tables(here)
    OP._force_small_tables(prev)
    assert prev is here
    other = "0" if here else "1"
    r = _import_and_read_switch(other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(not here)  # the switch's value right after import


def test_force_small_tables_bad_value_fails_import_clearly():
    r = _import_and_read_switch("sometimes")
    assert r.returncode != 0
    assert "OPENSORA_FAST_FORCE_SMALL_TABLES must be 0 or 1" in r.stderr


# ---- every op's kernels --------------------------------------------------------------------


@pytest.mark.cuda
def test_the_build_has_a_cuda_kernel_for_every_op():
    # a CPU-only build would otherwise pass the CUDA tests through the references
    skip_without_native()
    assert opensora_fast.build_info()["cuda_kernels"] is True
    for name in _ext.registered_ops():
        op = name.split("::", 1)[1]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), op


def _defined_functions(path: str) -> list:
    """Names of the functions an ELF64 little-endian shared object defines in its
    dynamic symbol table (no binutils needed)."""
    import struct

    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 little-endian file"
    shoff, shentsize, shnum = struct.unpack_from("<Q", data, 0x28)[0], *struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _name, kind, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        str_off = sections[link][4]
        for at in range(off, off + size, entsize):
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, at)
            if st_info & 0xF == 2 and st_shndx != 0:  # STT_FUNC, defined
                end = data.index(b"\0", str_off + st_name)
                names.append(data[str_off + st_name : end].decode())
    return names


@needs_native
def test_cpu_scalar_cores_are_inlined_into_the_kernels():
    # An out-of-line copy of a scalar core means a CPU loop calls it per element
    # and does not vectorise (the bf16 EMA once ran 10x slower that way). The CUDA
    # bodies and the grid walks instantiate the same cores, which is what tempts
    # the compiler to outline them.
    import opensora_fast._C as ext

    names = _defined_functions(ext.__file__)
    assert any("opensora_fast" in n for n in names)  # the reader sees our symbols
    cores = ("3ema10ema_compat", "3ema14ema_stochastic", "3ema12nearest_bits", "3ema10widen_bits")
    outlined = [n for n in names if n.startswith("_ZN13opensora_fast") and any(c in n for c in cores)]
    assert not outlined, f"scalar cores compiled out of line: {outlined[:4]}"
