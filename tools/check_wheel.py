"""Reads `auditwheel show --json WHEEL` (on stdin) and says whether auditwheel
accepts the wheel's manylinux tag: the tag its symbol versions allow (sym_tag) must
be the wheel's own, and the only external libraries may be the ones torch and its
nvidia-* wheels provide at runtime (excluded from repair on purpose: a torch
extension must use the torch it runs under). auditwheel's overall tag stays
linux_x86_64 because of exactly those libraries; `show` has no --exclude.

    auditwheel show --json W.whl | python tools/check_wheel.py W.whl
"""

import fnmatch
import json
import os
import sys

# the same list as tools/build_wheels.sh's EXCLUDE
PROVIDED = (
    "libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so libtorch_global_deps.so "
    "libc10.so libc10_cuda.so libgomp.so.1 libcudart.so.* libcuda.so.* libnvrtc.so.* libcublas*.so.* "
    "libcusparse.so.* libcufft.so.* libcurand.so.* libcusolver.so.* libnvToolsExt.so.* libnvJitLink.so.* "
    "libcupti.so.*"
).split()

wheel = os.path.basename(sys.argv[1])
info = json.load(sys.stdin)
plat = wheel[: -len(".whl")].split("-")[-1]
sym = info["sym_tag"]
libs = info.get("external_libs", {})
external = sorted(libs)


def provided(lib):
    path = libs[lib] or ""  # resolved with torch's lib dirs on the search path (build_wheels.sh)
    in_torch = f"{os.sep}torch{os.sep}lib{os.sep}" in path or f"{os.sep}nvidia{os.sep}" in path
    return in_torch or any(fnmatch.fnmatch(lib, p) for p in PROVIDED)


unexpected = [lib for lib in external if not provided(lib)]
ok = sym in plat.split(".") and plat.startswith("manylinux") and not unexpected
print(
    f"auditwheel: symbols allow {sym}; wheel tagged {plat}; external libraries {', '.join(external) or 'none'}"
    + (
        " (all torch's, not grafted by design)"
        if not unexpected
        else f"; NOT provided by torch: {', '.join(unexpected)}"
    )
)
print("auditwheel check:", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
