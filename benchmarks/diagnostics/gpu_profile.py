"""Where the host time goes on the GPU machine, for the calls that gpu_check found
host-bound: the NCCL checkpoint gather (1 rank, 1082 tensors), the loss, and the
conditioning (with and without its t2v-fallback log line). Prints cProfile's top
functions and the device timeline of one gather (first device event after the
call starts, busy time per kind, idle time).
Run on the device machine after building:  python -m benchmarks.diagnostics.gpu_profile [ckpt]"""

import cProfile
import io
import logging
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import call_us
from opensora_fast.utils.inference import prepare_inference_condition
from opensora_fast.utils.train import get_batch_loss

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run of the script
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
PIN = dev.type == "cuda"


def top(fn, n=12, calls=20, sort="tottime"):
    fn()
    sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(sort).print_stats(n)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print("\n".join("    " + ln[:150] for ln in lines[start - 1 : start + n + 1]))


def timeline(fn):
    """One call: wall, when the first device event starts, busy time per kind."""
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * PIN) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not ev:
        print(f"    wall {wall:.2f} ms; no device events")
        return
    cpu0 = min(e.time_range.start for e in prof.events() if e.device_type == DeviceType.CPU)
    kinds = {}
    for e in ev:
        name = e.name
        kind = (
            ("memcpy " + name.split()[1])
            if name.startswith("Memcpy")
            else ("nccl" if "nccl" in name.lower() else ("unpad" if "unpad" in name.lower() else name[:40]))
        )
        kinds[kind] = kinds.get(kind, 0) + (e.time_range.end - e.time_range.start)
    first = min(e.time_range.start for e in ev) - cpu0
    last = max(e.time_range.end for e in ev) - cpu0
    busy = sum(kinds.values())
    print(
        f"    wall {wall:.2f} ms; first device event at {first / 1e3:.2f} ms, last ends {last / 1e3:.2f} ms; "
        f"device busy {busy / 1e3:.2f} ms in {len(ev)} events"
    )
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:8]:
        print(f"      {k:44s} {v / 1e3:8.2f} ms")


def ckpt_case():
    from benchmarks.layouts import flux_mmdit_11b_shapes
    from opensora_fast.utils import ckpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    dist.init_process_group("nccl" if PIN else "gloo", rank=0, world_size=1)
    shapes = flux_mmdit_11b_shapes(d=1024 if PIN else 32)
    ema = torch.nn.Module()
    for i, s in enumerate(shapes):
        ema.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s, device=dev).bfloat16()))
    shape_dict = ckpt.record_model_param_shape(ema)
    ckpt.model_sharding(ema)
    pinned = {k: torch.empty(v, dtype=torch.bfloat16, pin_memory=PIN) for k, v in shape_dict.items()}
    nbytes = sum(p.numel() * 2 for p in ema.parameters())
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=PIN)
    print(f"[NCCL 1 rank, {nbytes / 1e9:.2f} GB]")
    print("  plain copy_:")
    timeline(lambda: dst.copy_(src, non_blocking=True))
    flat = ckpt.CheckpointIO._pinned_dict((k, v, torch.bfloat16) for k, v in shape_dict.items())
    for what, out, staging in (
        ("separate", pinned, False),
        ("separate", pinned, True),
        ("CheckpointIO's segments", flat, None),
    ):
        print(f"  model_gathering into {what} pinned, staging={staging}:")
        timeline(lambda: ckpt.model_gathering(ema, shape_dict, out, progress=False, staging=staging))
    print("  model_gathering host profile (cProfile, 3 calls):")
    top(lambda: ckpt.model_gathering(ema, shape_dict, pinned, progress=False), n=16, calls=3)
    print("  the same into CheckpointIO's segments (staged), by cumulative time:")
    top(lambda: ckpt.model_gathering(ema, shape_dict, flat, progress=False), n=24, calls=3, sort="cumulative")
    dsts = list(flat.values())
    for what, f in (
        ("dist.barrier()", dist.barrier),
        ("state_dict(keep_vars=True)", lambda: ema.state_dict(keep_vars=True)),
        ("_run_starts(segment views)", lambda: ckpt._run_starts(dsts)),
        ("model_gathering (segments), wall", lambda: ckpt.model_gathering(ema, shape_dict, flat, progress=False)),
    ):
        print(f"  {what:36s} {call_us(f, 5 if 'wall' in what else 20, sync=sync, each=True, warmup=2) / 1e3:8.2f} ms")
    dist.destroy_process_group()


def loss_and_condition():
    g = torch.Generator(device=dev).manual_seed(0)
    pred = torch.randn(4, 8316, 64, generator=g, device=dev).bfloat16().requires_grad_()
    target = torch.randn(4, 8316, 64, generator=g, device=dev).bfloat16()
    masks = torch.zeros(4, 33, 24, 42, device=dev)
    masks[0, 0] = 1
    for name, m in (("unmasked", None), ("masked", masks)):
        print(f"  get_batch_loss fwd+bwd {name} (cProfile, 200 calls):")
        top(lambda: torch.autograd.grad(get_batch_loss(pred, target, m), [pred]), n=10, calls=200)
    fwd = lambda: get_batch_loss(pred, target)  # noqa: E731
    print(f"  unmasked forward only: host {call_us(fwd, sync=sync):.1f} us")
    print(
        f"  F.mse_loss fwd+bwd: host "
        f"{call_us(lambda: torch.autograd.grad(torch.nn.functional.mse_loss(pred.float(), target.float()), [pred]), sync=sync):.1f} us"
    )
    z = torch.randn(4, 16, 33, 24, 42, generator=g, device=dev).bfloat16()
    refs = [[torch.randn(16, 33, 24, 42, generator=g, device=dev).bfloat16()] for _ in range(4)]
    refs[2] = None
    f = lambda: prepare_inference_condition(z, "v2v_head", refs)  # noqa: E731
    lg = logging.getLogger("opensora_fast")
    err, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        lg.setLevel(logging.NOTSET)
        on = call_us(f, sync=sync, each=True)
    finally:
        sys.stderr = err
    lg.setLevel(logging.ERROR)
    off = call_us(f, sync=sync, each=True)
    print(f"  v2v_head wall: log line to stderr {on:.1f} us, logger off {off:.1f} us")
    print("  v2v_head (cProfile, 200 calls, logger off):")
    top(f, n=10, calls=200)


if __name__ == "__main__":
    print(f"host profile on {torch.cuda.get_device_name() if PIN else 'cpu'}, torch {torch.__version__}")
    if "ckpt" not in sys.argv[1:]:
        loss_and_condition()
    ckpt_case()
