#!/usr/bin/env bash
# tools/wheel_pythons.sh VENV_DIR TORCH_VERSION VERSION... : for each Python VERSION
# (3.10, 3.11, ...) found here (pythonX.Y on PATH, else pyenv's), a build venv
# VENV_DIR/pyX.Y with torch==TORCH_VERSION, setuptools and ninja (made once); prints
# the venvs' interpreters, one a line. A version that is not installed, or for which
# that torch has no wheel, is skipped with a note on stderr.
set -uo pipefail
dir=$1 torch_version=$2
shift 2
mkdir -p "$dir"
for v in "$@"; do
    base=""
    for cand in "$(command -v "python$v" 2>/dev/null)" "$HOME"/.pyenv/versions/"$v".*/bin/python"$v" /usr/bin/python"$v"; do
        if [ -n "$cand" ] && [ -x "$cand" ]; then base=$cand; break; fi
    done
    if [ -z "$base" ]; then echo "wheels: Python $v not found, skipped" >&2; continue; fi
    venv="$dir/py$v"
    stamp="$venv/.stamp-torch-$torch_version"
    if [ ! -e "$stamp" ]; then
        rm -rf "$venv"
        echo "wheels: making $venv ($base, torch==$torch_version)" >&2
        if ! { "$base" -m venv "$venv" &&
               "$venv/bin/python" -m pip install -q "torch==$torch_version" "setuptools>=64" wheel ninja numpy >&2; }; then
            echo "wheels: Python $v: torch==$torch_version not installable, skipped" >&2
            rm -rf "$venv"
            continue
        fi
        touch "$stamp"
    fi
    echo "$venv/bin/python"
done
