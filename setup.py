"""Build of opensora_fast._C: CPU kernels always, CUDA kernels when torch is a
CUDA build and nvcc is found. Environment:

  OPENSORA_FAST_NO_EXT=1       pure-Python install (every op runs its reference)
  OPENSORA_FAST_NO_CUDA=1      CPU kernels only
  TORCH_CUDA_ARCH_LIST         default "8.0;9.0+PTX" (SASS for sm_80 and sm_90, PTX for
                               compute_90: newer GPUs, Blackwell included, JIT-compile it
                               at first use); clusters: "8.0;8.6;9.0;10.0;12.0+PTX"
  CUDA_HOME                    default: the toolkit that holds nvcc
  OPENSORA_FAST_LOCAL_VERSION  the version's local tag; default from the build's
                               torch and CUDA ("cu130torch2.14", "cputorch2.14");
                               "" for none (an index that refuses local versions)

The version is opensora_fast/_version.py's plus that local tag (an sdist carries
none: it is tagged when built). Building the extension also writes
opensora_fast/_build_meta.py (the torch and CUDA it was built against), which
opensora_fast._ext reads BEFORE loading _C to turn a torch/CUDA mismatch into one
clear error instead of an undefined-symbol ImportError, and which archs carry
SASS and which PTX (``python -m opensora_fast info``).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit that really holds nvcc. torch guesses dirname(dirname(which nvcc)),
    which is wrong when nvcc on PATH is a wrapper script (/usr/local/bin/nvcc here)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper that execs the real nvcc: read its target
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            m = re.search(r"(/\S+)/bin/nvcc", head)
            if m:
                candidates.append(m.group(1))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if (
            c
            and os.path.exists(os.path.join(c, "bin", "nvcc"))
            and os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))
        ):
            return c
    return None


HERE = os.path.dirname(os.path.abspath(__file__))
META = os.path.join(HERE, "opensora_fast", "_build_meta.py")


def _base_version() -> str:
    with open(os.path.join(HERE, "opensora_fast", "_version.py")) as f:
        return re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M).group(1)


def _local_tag(torch_version: str, cuda_version) -> str:
    """'cu130torch2.14' (flash-attn's convention) or 'cputorch2.14'."""
    torch_mm = ".".join(torch_version.split("+")[0].split(".")[:2])
    cuda = "cu" + "".join(cuda_version.split(".")[:2]) if cuda_version else "cpu"
    return f"{cuda}torch{torch_mm}"


def _version(local: str) -> str:
    local = os.environ.get("OPENSORA_FAST_LOCAL_VERSION", local)
    base = _base_version()
    return f"{base}+{local}" if local else base


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # the Makefile's default too (tests/test_package.py)


def _arch_of(code: str) -> str:
    """'sm_90a' or 'compute_100' -> '9.0a' / '10.0'."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", code)
    return f"{m.group(1)}.{m.group(2)}{m.group(3)}" if m else code


def _sass_and_ptx(archs: str):
    """The archs TORCH_CUDA_ARCH_LIST=``archs`` gives SASS (code=sm_XX) and PTX
    (code=compute_XX), each as "8.0;9.0", read from the -gencode flags torch's
    extension build passes to nvcc (its own parse, named archs included)."""
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except Exception:  # a private helper: if it changes, parse "X.Y[+PTX]" entries ourselves
        flags = []
        for a in re.split(r"[;\s]+", archs.strip()):
            num = a[:-4] if a.endswith("+PTX") else a
            code = num.replace(".", "")
            flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
            if a.endswith("+PTX"):
                flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    codes = [m for f in flags for m in re.findall(r",code=\[?([\w,]+)\]?", f)]
    codes = [c for group in codes for c in group.split(",")]

    def key(a):
        m = re.match(r"(\d+)\.(\d+)", a)
        return (int(m.group(1)), int(m.group(2)), a) if m else (0, 0, a)

    sass = sorted({_arch_of(c) for c in codes if c.startswith("sm_")}, key=key)
    ptx = sorted({_arch_of(c) for c in codes if c.startswith("compute_")}, key=key)
    return ";".join(sass), ";".join(ptx)


def _write_build_meta(version, torch_version, torch_cuda, cuda_version, archs) -> None:
    sass, ptx = _sass_and_ptx(archs) if archs else ("", "")
    text = (
        '"""Written by setup.py when it built opensora_fast._C; read by _ext.py before\n'
        'loading _C (a build for another torch or CUDA fails there with one clear error)."""\n'
        f"VERSION = {version!r}\n"
        f"TORCH_VERSION = {torch_version!r}  # the torch _C was compiled against\n"
        f"TORCH_CUDA = {torch_cuda!r}  # that torch's CUDA (None: a CPU torch)\n"
        f"CUDA_VERSION = {cuda_version!r}  # CUDA of _C's kernels (None: CPU kernels only)\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CUDA_SASS = {sass!r}  # archs with machine code in _C\n"
        f"CUDA_PTX = {ptx!r}  # archs with PTX (JIT-compiled on newer GPUs)\n"
        f"PYTHON = {'%d.%d' % sys.version_info[:2]!r}\n"
    )
    try:
        with open(META) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(META, "w") as f:
        f.write(text)


def _sanitize(s: str) -> str:
    # Passed through -D and a shell: keep to characters a pp-number/identifier holds.
    return re.sub(r"[^A-Za-z0-9._+]", "_", s)


# ---- libstdc++ must be linked shared ------------------------------------------------
# A compiler that cannot find libstdc++.so (e.g. a relocated g++ behind a wrapper
# script, as on some GPU images) silently links libstdc++.a into _C. Then every
# C++ exception an op throws (every bad-input error) is thrown by one C++ runtime
# and caught by torch's, and Python segfaults. So: link the libstdc++ this process
# (torch) has loaded when the compiler has no shared one, and refuse a _C that
# still does not load libstdc++ dynamically.


def _loaded_libstdcxx():
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if re.search(r"/libstdc\+\+\.so\.6(\.|$)", path) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _shared_libstdcxx_args(drivers):
    """[path of torch's libstdc++.so.6] when a compiler driver that may link _C
    (setuptools picks among CXX, LDSHARED and the sysconfig ones) has no shared
    libstdc++; else []. An explicit shared input ahead of the driver's -lstdc++
    leaves nothing for a static archive to supply."""
    if not sys.platform.startswith("linux"):
        return []
    for d in drivers:
        try:
            found = subprocess.run(
                [d, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if not os.path.isabs(found):
            loaded = _loaded_libstdcxx()
            if loaded:
                print(
                    f"opensora_fast: {d} has no shared libstdc++; linking {loaded} (the one torch loaded)",
                    file=sys.stderr,
                )
                return [loaded]
    return []


def _needed_libs(so_path):
    """DT_NEEDED of a built library (readelf ships with the linker), or None if unknown."""
    readelf = shutil.which("readelf")
    if not readelf:
        return None
    out = subprocess.run([readelf, "-d", so_path], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _check_shared_libstdcxx(so_path, drivers):
    needed = _needed_libs(so_path)
    if needed is not None and not any(n.startswith("libstdc++.so") for n in needed):
        os.remove(so_path)  # never leave a _C that crashes on its first error
        raise RuntimeError(
            f"opensora_fast: {so_path} was linked with a static libstdc++ (compiler drivers: {', '.join(drivers)}), "
            "so any error raised by its ops would crash Python. Build with a compiler that links "
            "libstdc++ dynamically, e.g. CXX=g++ CC=gcc LDSHARED='g++ -shared'."
        )


def _extensions():
    if _flag("OPENSORA_FAST_NO_EXT"):
        print("opensora_fast: OPENSORA_FAST_NO_EXT=1, building no extension", file=sys.stderr)
        if os.path.exists(META):
            os.remove(META)  # no _C: nothing to check at import
        return [], {}, _version("")
    cuda_home = None
    import torch

    if torch.version.cuda and not _flag("OPENSORA_FAST_NO_CUDA"):
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class Build(BuildExtension):
        def build_extensions(self):
            cmds = (getattr(self.compiler, a, None) for a in ("compiler_cxx", "linker_so_cxx", "linker_so"))
            drivers = list(dict.fromkeys(c[0] for c in cmds if c))
            for e in self.extensions:
                e.extra_link_args = list(e.extra_link_args) + _shared_libstdcxx_args(drivers)
            super().build_extensions()
            for e in self.extensions:
                _check_shared_libstdcxx(self.get_ext_fullpath(e.name), drivers)

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 2, 8)))
    here = HERE
    # registration.cpp, then each op's folder: <op>.cpp (schemas, checks), <op>_cpu.cpp
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    macros = [("OSF_TORCH_VERSION", _sanitize(torch.__version__))]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs = [os.path.join(here, "csrc")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if cuda_home:
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [
            ("OSF_WITH_CUDA", None),
            ("OSF_TORCH_CUDA", _sanitize(torch.version.cuda)),
            ("OSF_CUDA_ARCHS", _sanitize(archs.replace(";", "_").replace(" ", "_"))),
        ]
        # ATen's CUDA headers include cublas/cusparse headers; a minimal
        # toolkit lacks them, and the pip CUDA wheels have them. Searched after
        # the toolkit's own include dir (CUDAExtension adds that one first), and
        # only when the toolkit lacks them.
        extra_inc = []
        if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
            major = torch.version.cuda.split(".")[0]
            for base in sys.path:
                inc = os.path.join(base, "nvidia", f"cu{major}", "include")
                if os.path.exists(os.path.join(inc, "cusparse.h")):
                    extra_inc.append(inc)
                    break
        ext = CUDAExtension(
            "opensora_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx + [f"-isystem{d}" for d in extra_inc],
                "nvcc": ["-O3"] + [f"-isystem={d}" for d in extra_inc],
            },
            **kwargs,
        )
        print(f"opensora_fast: building CPU+CUDA kernels (CUDA_HOME={cuda_home}, archs={archs})", file=sys.stderr)
    else:
        ext = CppExtension(
            "opensora_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            **kwargs,
        )
        why = "torch has no CUDA" if not torch.version.cuda else "no nvcc/CUDA toolkit found"
        print(f"opensora_fast: building CPU kernels only ({why})", file=sys.stderr)
    cuda_version = torch.version.cuda if cuda_home else None
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if cuda_home else ""
    version = _version(_local_tag(torch.__version__, cuda_version))
    if "sdist" in sys.argv[1:]:
        version = _version("")  # tagged when built, by the torch it is built against
    else:
        _write_build_meta(version, torch.__version__, torch.version.cuda, cuda_version, archs)
    return [ext], {"build_ext": Build}, version


ext_modules, cmdclass, version = _extensions()

setup(
    version=version,
    packages=find_packages(include=["opensora_fast", "opensora_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
