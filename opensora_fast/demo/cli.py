"""``python -m opensora_fast demo``: argument checks (all before any work, so bad
input writes nothing), the runs, the table, the JSON, the chart, the video."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
from typing import Optional

DEFAULT_OUT = os.path.join("benchmarks", "results")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .sides import SIZES

    p.add_argument(
        "--size",
        choices=list(SIZES),
        default="small",
        help="tiny: the smoke test (<1 min on 2 CPU cores); small (default): a few minutes on 2 CPU "
        "cores; gpu: sized for one H100/H200",
    )
    p.add_argument("--steps", type=_positive, default=None, help="training steps per run (default: per size)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"directory for demo-<machine>-<date>.json/.png and the sample (default: {DEFAULT_OUT})",
    )
    p.add_argument("--seed", type=int, default=1024, help="seed of both runs (default: 1024, upstream's)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _device(parser: argparse.ArgumentParser, text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device {text!r} is not a device (use cpu, cuda or cuda:N)")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        parser.error(f"--device {text!r}: the demo runs on cpu or cuda only")
    if not torch.cuda.is_available():
        parser.error(f"--device {text!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        parser.error(f"--device {text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _check_out(parser: argparse.ArgumentParser, out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".demo-probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {out}: cannot write there ({e.strerror or e})")
    return out


def _init_world(device) -> bool:
    """A one-process group for the shard and gather helpers (gloo on the CPU,
    nccl on a GPU); returns whether this call made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = _device(parser, args.device)
    out = _check_out(parser, args.out)
    import torch
    import torch.distributed as dist

    from . import loop, report
    from .sides import SIZES, sides

    if device.type == "cuda":
        torch.cuda.set_device(device)
    size = SIZES[args.size]
    steps = args.steps or size.steps
    if args.size == "gpu" and device.type == "cpu":
        print("demo: --size gpu on the CPU will take a long time", file=sys.stderr)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    slug = report.machine_slug(device)
    stem = os.path.join(out, f"demo-{slug}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}")
    run_sides = sides()
    print(
        f"opensora_fast demo: size {size.name} ({size.describe()}), {steps} steps, ckpt every "
        f"{size.ckpt_every}, device {device}; runs: {', '.join(s.label for s in run_sides)}",
        flush=True,
    )
    made_world = _init_world(device)
    ckpt_root = tempfile.mkdtemp(prefix="osf-demo-ckpt-")
    try:
        runs = loop.run_lockstep(run_sides, size, steps, device, args.seed, ckpt_root, progress=not args.no_progress)
        mem_steps = min(steps, size.ckpt_every + 1) if size.ckpt_every else min(steps, 2)
        for side, run in zip(run_sides, runs):
            mem = loop.peak_memory(side, size, mem_steps, device, args.seed, ckpt_root)
            run.update(
                peak_memory_bytes=mem["peak_bytes"],
                base_memory_bytes=mem["base_bytes"],
                memory_kind=f"{mem['kind']}, one side alone over {mem['steps']} steps",
            )
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        if made_world:
            dist.destroy_process_group()
    summaries = [loop.summarize(r, size.ckpt_every) for r in runs]
    video_path, video_kind = report.save_sample(runs[-1]["sampling"]["video"], stem + "-sample")
    fused_note = (
        None
        if any(s.key == "fused" for s in run_sides)
        else ("absent: opensora_fast.optim.FusedAdamW does not import here (the column appears once it does)")
    )
    extra = {
        "sample_output": f"{video_path or '-'} [{video_kind}; i2v_head from the saved EMA, {runs[-1]['label']} run]",
        "op_benchmarks": report.op_benchmark_ratios(out, slug),
        "fused_column": fused_note,
        "json_path": stem + ".json",
        "png_path": stem + ".png" if matplotlib is not None else None,
    }
    doc = report.build_document(runs, summaries, size, steps, device, args.seed, extra)
    report.write_json(doc, stem + ".json")
    if matplotlib is not None:
        report.write_chart(doc, stem + ".png")
    else:
        doc["png_path"] = None
        print("demo: matplotlib is not installed, so no chart (pip install matplotlib)", file=sys.stderr)
    print(report.table(doc), flush=True)
    bad = [k for k, a in doc["agreement"].items() if not a["ok"]]
    if bad:
        print(f"demo: the runs disagree beyond the stated tolerance: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m opensora_fast demo")
    add_arguments(parser)
    return parser
