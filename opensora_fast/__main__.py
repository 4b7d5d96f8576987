"""``python -m opensora_fast info [--json]``: what was built and what will run.
``python -m opensora_fast demo [--size tiny|small|gpu] [--steps N] [--device D] [--out DIR]``:
the side-by-side training demo. ``python -m opensora_fast run SCRIPT [ARGS...]``:
patch an installed Open-Sora, then run SCRIPT unchanged (also under ``torchrun -m``)."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_script(script: str, args: list, quiet: bool = False) -> int:
    """Patch Open-Sora (:func:`opensora_fast.patch_opensora`), then run ``script``
    as ``__main__`` with ``sys.argv = [script, *args]`` and its directory first on
    ``sys.path``, as ``python script`` would. The script's exit status is ours."""
    if not os.path.isfile(script):
        print(f"python -m opensora_fast run: no such script: {script}", file=sys.stderr)
        return 2
    script_dir = os.path.dirname(os.path.abspath(script))
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    from . import patch_opensora

    patched = patch_opensora()
    if not quiet and _is_rank0():
        if patched:
            names = sorted({p.rsplit(".", 1)[1] for p in patched})
            print(f"opensora_fast: patched {len(patched)} Open-Sora locations ({', '.join(names)})", file=sys.stderr)
        else:
            print(
                "opensora_fast: nothing patched (no importable opensora.utils module); running the script as is",
                file=sys.stderr,
            )
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opensora_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print the build: version, torch, native and CUDA kernels, archs, ops")
    info.add_argument("--json", action="store_true", help="one JSON object")
    demo = sub.add_parser("demo", help="Open-Sora-shaped training + sampling, upstream-faithful vs opensora_fast")
    from .demo.cli import add_arguments

    add_arguments(demo)
    run = sub.add_parser("run", help="patch an installed Open-Sora, then run SCRIPT [ARGS...] unchanged")
    run.add_argument("-q", "--quiet", action="store_true", help="do not report what was patched")
    run.add_argument("script", help="the training or sampling script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, passed through")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .demo.cli import main as demo_main

        return demo_main(args, demo)
    if args.cmd == "run":
        return run_script(args.script, args.args, quiet=args.quiet)

    from . import build_info

    data = build_info()
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        width = max(map(len, data))
        for k, v in data.items():
            if isinstance(v, list):
                v = ", ".join(v) or "-"
            print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
