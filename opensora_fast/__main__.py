"""``python -m opensora_fast info [--json]``: what was built and what will run."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opensora_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print the build: version, torch, native and CUDA kernels, archs, ops")
    info.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)

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
