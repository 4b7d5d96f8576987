"""Host time per call: what a call costs before any real work, the part that
dominated on the H100 machine (benchmarks/gpu_breakdown.py). Best of 5 batches of
2000 calls, no sync inside a batch.

  python -m benchmarks.diagnostics.host_overhead          tiny CPU inputs, one thread
  python -m benchmarks.diagnostics.host_overhead cuda     the GPU bench's conditioning sizes,
                                              split into stages (Python planning,
                                              the op alone, per source, per row)"""

import logging
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import call_us
from opensora_fast.utils import _condition
from opensora_fast.utils.inference import prepare_inference_condition
from opensora_fast.utils.train import get_batch_loss

logging.getLogger("opensora_fast").setLevel(logging.ERROR)


def cpu_cases():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 16, 8, generator=g)
    masks = torch.zeros(4, 4, 4, 4)  # T=4, 2x2 tokens per frame at patch 2: L=16
    masks[0, 0] = 1
    masks[1, -1] = 1
    z = torch.randn(4, 4, 9, 4, 6, generator=g).bfloat16()
    refs = [[torch.randn(4, 9, 4, 6, generator=g).bfloat16()] for _ in range(4)]
    return {
        "F.mse_loss fwd+bwd (for scale)": lambda: torch.autograd.grad(F.mse_loss(p.float(), t.float()), [p]),
        "get_batch_loss fwd+bwd unmasked": lambda: torch.autograd.grad(get_batch_loss(p, t), [p]),
        "get_batch_loss fwd+bwd masked": lambda: torch.autograd.grad(get_batch_loss(p, t, masks), [p]),
        "prepare_inference_condition v2v_head": lambda: prepare_inference_condition(z, "v2v_head", refs),
        "prepare_inference_condition i2v_loop": lambda: prepare_inference_condition(z, "i2v_loop", refs),
    }


def stage_cases(dev):
    """The bench's [4,16,33,24,42] bf16 conditioning, every sample referenced,
    taken apart: whole drop-in, its Python planning alone (op stubbed), the op
    alone on the same sources and plan, and the op with 1 source for all rows."""
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(4, 16, 33, 24, 42, generator=g, device=dev).bfloat16()
    vids = [[torch.randn(16, 33, 24, 42, generator=g, device=dev).bfloat16()] for _ in range(4)]
    imgs = [[torch.randn(16, 1, 24, 42, generator=g, device=dev).bfloat16() for _ in range(2)] for _ in range(4)]
    captured = {}  # the op's arguments, caught instead of running it

    def capture(zz, sources, plan):
        captured["last"] = (zz, list(sources), list(plan))
        return None, None

    def planning(mode, refs):
        real, _condition.condition_lists = _condition.condition_lists, capture
        try:
            prepare_inference_condition(z, mode, refs)
        finally:
            _condition.condition_lists = real

    cases = {}
    op = torch.ops.opensora_fast.condition.default
    for name, mode, refs in (
        ("v2v_head", "v2v_head", vids),
        ("i2v_loop 1-frame refs", "i2v_loop", imgs),
        ("i2v_loop video refs", "i2v_loop", vids),
    ):
        planning(mode, refs)
        zz, srcs, plan = captured["last"]
        one = [0 if k % 5 == 3 else v for k, v in enumerate(plan)]
        rows, ns = len(plan) // 5, len(srcs)
        cases[f"{name}: drop-in"] = lambda m=mode, r=refs: prepare_inference_condition(z, m, r)
        cases[f"{name}: planning alone"] = lambda m=mode, r=refs: planning(m, r)
        cases[f"{name}: op, {ns} sources, {rows} rows"] = lambda zz=zz, s=srcs, p=plan: op(zz, s, p)
        cases[f"{name}: op, 1 source, {rows} rows"] = lambda zz=zz, s=srcs[:1], p=one: op(zz, s, p)
        cases[f"{name}: op, 1 source, 1 row"] = lambda zz=zz, s=srcs[:1], p=one[:5]: op(zz, s, p)
    cases["two torch.empty like the outputs"] = lambda: (torch.empty_like(z[:, :1]), torch.empty_like(z))
    return cases


if __name__ == "__main__":
    dev = torch.device(sys.argv[1]) if len(sys.argv) > 1 else None
    if dev is None:
        cases, where = cpu_cases(), "tiny inputs, 1 thread"
    else:
        cases, where = stage_cases(dev), f"{dev}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}"
    sync = torch.cuda.synchronize if dev is not None and dev.type == "cuda" else None
    print(
        f"per call, {where}, torch {torch.__version__} (us; host: best of 5 x 2000 calls issued back to back;"
        " wall: median of 2000 calls with a device sync after each)"
    )
    print(f"  {'':52s} {'host':>8s} {'wall':>8s}")
    for name, fn in cases.items():
        print(
            f"  {name:52s} {call_us(fn, 2000, batches=5, sync=sync):8.1f} {call_us(fn, 2000, sync=sync, each=True):8.1f}"
        )
