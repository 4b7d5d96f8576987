"""Calls every CUDA op (loss_ranges included) on small odd shapes, for compute-sanitizer
(memcheck, racecheck, synccheck, initcheck) in benchmarks/gpu_check.sh.

    python benchmarks/diagnostics/sanitize_ops.py [ops] [graphs] [gather]   (default: all three)

ops: every op once, eager; graphs: the ops captured in a CUDA graph and replayed;
gather: the bucketed checkpoint gather (1-rank NCCL), staged through the copy engine
and direct. With OPENSORA_FAST_FORCE_SMALL_TABLES=1 every launch uses the small
tables, so plans split into many more launches."""

import glob
import importlib
import os
import sys

import torch

import opensora_fast  # noqa: F401  (loads the ops)

OP = torch.ops.opensora_fast
dev = "cuda"
g = torch.Generator().manual_seed(0)


def _unpad_args(shapes, world, dtype):
    shard = [-(-torch.Size(s).numel() // world) for s in shapes]
    offset = [sum(shard[:i]) for i in range(len(shard))]
    gathered = torch.randn(world, sum(shard), generator=g).to(dtype).to(dev)
    return gathered, offset, shard, [0] * len(shard), shard


def ops() -> None:
    """Every op once (eager), then each benchmark file's own ``sanitize`` cases."""
    _eager_ops()
    # ops added since keep their cases in their own benchmark file: a `sanitize(device)` there
    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench_*.py"))):
        module = importlib.import_module(f"benchmarks.{os.path.splitext(os.path.basename(path))[0]}")
        if hasattr(module, "sanitize"):
            module.sanitize(dev)


def _eager_ops() -> None:
    for edt, sdt in [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]:
        sizes = [1, 3, 4099, 32768 * 3 + 5] + [17] * 300
        ema = [torch.randn(n + 1, generator=g).to(edt).to(dev)[1:] for n in sizes]  # misaligned
        src = [torch.randn(n, generator=g).to(sdt).to(dev) for n in sizes]
        OP.ema_update_(ema, src, 0.999, False, 0)
        OP.ema_update_(ema, src, 0.999, True, 5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        p = torch.randn(3, 3001, 7, generator=g).to(dtype).to(dev)
        t = torch.randn(3, 3001, 7, generator=g).to(dtype).to(dev)
        r = torch.tensor([[0, 3001], [5, 2999], [1, 1]], device=dev)
        OP.masked_mse(p, t, r)
        OP.masked_mse_backward(torch.tensor(0.5, device=dev), p, t, r)
        OP.masked_mse(p[:, 1:].contiguous(), t[:, 1:].contiguous(), r.clamp(max=3000))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        srcs = _condition_sources()
        plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 4, 3, 2, 2, 3, 2, 4, 2, 6, 2, 3, 0]
        # z is read (initcheck): random, not empty
        OP.condition(torch.randn(3, 5, 9, 13, 11, generator=g).to(dtype).to(dev), srcs, plan)
        OP.condition_cat_(torch.empty(3, 6, 9, 13, 11, dtype=dtype, device=dev), srcs, plan)
        big = [torch.randn(2, 4, 97, 101, generator=g).to(dtype).to(dev)]  # several chunks per piece
        OP.condition_cat_(torch.empty(2, 3, 5, 97, 101, dtype=dtype, device=dev), big, [0, 1, 4, 0, 0, 1, 0, 2, 0, 2])
    for dtype, world in ((torch.bfloat16, 3), (torch.float32, 4), (torch.uint8, 5), (torch.complex128, 2)):
        # unpad_: params smaller than the world, 0-dim, odd sizes; into device and pinned memory
        shapes = [(), (1,), (2,), (5, 3), (40000,)] + [(17,)] * 300
        gathered, offset, shard, begin, count = _unpad_args(shapes, world, dtype)
        outs = [torch.empty(s, dtype=dtype, device=dev) for s in shapes]
        OP.unpad_(gathered, outs, offset, shard, begin, count)
        pinned = [torch.empty(s, dtype=dtype).pin_memory() for s in shapes]
        OP.unpad_(gathered, pinned, offset, shard, begin, count)
    for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int64):
        # loss_ranges: strided frame masks, T=1 and long T, more samples than a block
        for T in (1, 2, 33):
            full = (torch.rand(300, T, 3, generator=g) < 0.3).to(dtype).to(dev)
            for upstream in (True, False):
                OP.loss_ranges(full[:, :, 1], 7, upstream)


def _condition_sources() -> list:
    srcs = [
        torch.randn(5, 10, 13, 11, generator=g).to(sdt).to(dev)
        for sdt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ]
    srcs.append(torch.randn(6, 12, 14, 13, generator=g).to(dev)[1:, 1:11, 1:, :11])  # offset, strided
    return srcs


def graphs() -> None:
    """The graph-capturable ops captured once, replayed twice (new inputs between)."""
    sizes = [1, 4099, 32768 * 3 + 5] + [17] * 300
    ema = [torch.randn(n + 1, generator=g).bfloat16().to(dev)[1:] for n in sizes]
    src = [torch.randn(n, generator=g).to(dev) for n in sizes]
    p = torch.randn(3, 3001, 7, generator=g).bfloat16().to(dev)
    t = torch.randn(3, 3001, 7, generator=g).bfloat16().to(dev)
    r = torch.tensor([[0, 3001], [5, 2999], [1, 1]], device=dev)
    one = torch.ones((), device=dev)
    srcs = _condition_sources()
    plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 4, 3, 2, 2, 3, 2, 4, 2, 6, 2, 3, 0]
    cond = torch.empty(3, 6, 9, 13, 11, device=dev)
    shapes = [(), (1,), (5, 3), (40000,)] + [(17,)] * 300
    gathered, offset, shard, begin, count = _unpad_args(shapes, 3, torch.bfloat16)
    outs = [torch.empty(s, dtype=torch.bfloat16, device=dev) for s in shapes]
    mask = (torch.rand(300, 33, 3, generator=g) < 0.3).float().to(dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OP.ema_update_(ema, src, 0.999, False, 0)
        OP.masked_mse(p, t, r)
        OP.masked_mse_backward(one, p, t, r)
        OP.condition_cat_(cond, srcs, plan)
        OP.unpad_(gathered, outs, offset, shard, begin, count)
        OP.loss_ranges(mask[:, :, 1], 7, True)
    for _ in range(2):
        gathered.copy_(torch.randn(gathered.shape, generator=g))
        graph.replay()
    torch.cuda.synchronize()


def gather() -> None:
    """The bucketed gather over a 1-rank NCCL group (world size 1 would copy
    locally: its buckets are driven directly), staged through the copy engine
    into CheckpointIO's pinned segments, and direct into separate pinned tensors."""
    import torch.distributed as dist

    from opensora_fast.utils._ckpt_gather import gather_items
    from opensora_fast.utils._ckpt_plan import Item
    from opensora_fast.utils.ckpt import CheckpointIO

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shapes = [(5, 3), (), (1,), (4097,), (33, 17), (300, 301)] + [(17,)] * 40
        numels = [torch.Size(s).numel() for s in shapes]
        flat = torch.randn(sum(numels), generator=g).bfloat16().to(dev)  # shards side by side
        shards = list(flat.split(numels))
        names = [f"p{i}" for i in range(len(shapes))]
        for staging, pinned in (
            (True, CheckpointIO._pinned_dict([(k, s, torch.bfloat16) for k, s in zip(names, shapes)])),
            (False, {k: torch.empty(s, dtype=torch.bfloat16).pin_memory() for k, s in zip(names, shapes)}),
        ):
            items = [Item(k, sh, n, pinned[k]) for k, sh, n in zip(names, shards, numels)]
            for bucket_bytes in (4096, 1 << 20):  # many buckets (splits, the copy stream reused), one
                gather_items(
                    items, None, bucket_bytes=bucket_bytes, collective="auto", desc="sanitize", show=False,
                    fn="sanitize_ops", staging=staging,
                )  # fmt: skip
                torch.cuda.synchronize()
                for k, sh in zip(names, shards):
                    got, want = pinned[k].reshape(-1).view(torch.int16), sh.cpu().view(torch.int16)
                    assert torch.equal(got, want), f"gather staging={staging} bucket={bucket_bytes}: {k} differs"
                    pinned[k].fill_(-7.0)
    finally:
        dist.destroy_process_group()


SECTIONS = {"ops": ops, "graphs": graphs, "gather": gather}


def main(argv: list) -> int:
    names = argv or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"sanitize_ops: unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    small = os.environ.get("OPENSORA_FAST_FORCE_SMALL_TABLES", "")
    for n in names:
        print(f"sanitize_ops: {n}{' (small tables forced)' if small.strip() not in ('', '0') else ''}", flush=True)
        SECTIONS[n]()
        torch.cuda.synchronize()
    print(f"sanitize_ops: all ops ran ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
