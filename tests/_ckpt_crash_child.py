"""Helper of test_ckpt_crash.py (not a test): imports torch once, writes a
complete checkpoint of step 1, then for each kill point forks a process that
saves step 2 and is killed with SIGKILL (at the k-th write phase, or after a
random delay). Prints one JSON line per kill point."""

import json
import os
import random
import shutil
import signal
import sys
import time

import torch

torch.set_num_threads(1)

from opensora_fast.utils import _ckpt_write, ckpt  # noqa: E402


class Ema(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, n in enumerate([3000, 1, 257, 4096, 64, 8192]):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(n, generator=g).bfloat16()))
        self.register_parameter("s", torch.nn.Parameter(torch.randn((), generator=g)))
        self.register_buffer("b", torch.arange(5))


def save(root, seed, step):
    ema = Ema(seed)
    io = ckpt.CheckpointIO()
    io.save(
        None,
        root,
        ema=ema,
        epoch=0,
        step=step,
        global_step=step,
        actual_update_step=step,
        ema_shape_dict=ckpt.record_model_param_shape(ema),
        async_io=True,
    )
    io._sync_io()


def main():
    work, n_random = sys.argv[1], int(sys.argv[2])
    base = os.path.join(work, "base")
    save(base, 1, 1)
    # count the write phases of one save, and time it
    phases = []
    _ckpt_write.phase_hook = phases.append
    probe = os.path.join(work, "probe")
    shutil.copytree(base, probe)
    t0 = time.perf_counter()
    save(probe, 2, 2)
    took = time.perf_counter() - t0
    _ckpt_write.phase_hook = None
    points = [("phase", k) for k in range(1, len(phases) + 1)]
    rng = random.Random(1234)
    points += [("time", rng.uniform(0, 1.5 * took)) for _ in range(n_random)]
    for i, (kind, at) in enumerate(points):
        root = os.path.join(work, f"run{i}")
        shutil.copytree(base, root)
        pid = os.fork()
        if pid == 0:  # the save process
            try:
                if kind == "phase":
                    count = [0]

                    def hook(_name):
                        count[0] += 1
                        if count[0] == at:
                            os.kill(os.getpid(), signal.SIGKILL)

                    _ckpt_write.phase_hook = hook
                save(root, 2, 2)
            finally:
                os._exit(0)
        if kind == "time":
            time.sleep(at)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"root": root, "kind": kind, "at": at, "phases": phases, "killed": killed}), flush=True)


if __name__ == "__main__":
    main()
