"""Merges the pytest-benchmark JSON files of one ``make bench`` (or gpu_check) run
into ``benchmarks/results/<machine>-<date>.json`` with the machine, torch, build and
commit, so figures are data and not only a printed table.

  python -m benchmarks.collect DIR [--out benchmarks/results]"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
import subprocess
import sys

import torch

from benchmarks.common import bench_device, machine


def machine_slug() -> str:
    """A short file-name-safe name: the GPU's when benchmarking one, else the CPU's."""
    if bench_device().type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = machine().split(",")[0]
    name = re.sub(r"\((R|TM)\)|processor|cpu|@.*", "", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug or 'unknown'}-{torch.get_num_threads()}t"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def collect(src_dir: str, out_dir: str) -> str:
    """Writes the merged JSON; returns its path. Each input file keeps its own
    pytest-benchmark ``benchmarks`` list under its file name."""
    from opensora_fast._ext import build_info

    files = {}
    for path in sorted(glob.glob(os.path.join(src_dir, "*.json"))):
        with open(path) as f:
            files[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    if not files:
        raise SystemExit(f"benchmarks.collect: no JSON files in {src_dir}")
    now = _dt.datetime.now(_dt.timezone.utc)
    doc = {
        "machine": machine(),
        "device": str(bench_device()),
        "date": now.isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "build": build_info(),
        "files": files,
    }
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{machine_slug()}-{now:%Y-%m-%d}.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, out)  # a half-written result never replaces the last good one
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__.splitlines()[0])
    p.add_argument("src_dir")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    print(f"benchmark figures written to {collect(a.src_dir, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
