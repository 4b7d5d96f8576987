"""Per-call host paths of the drop-ins and their cleanup: the staged checkpoint
gather drains its copy stream however its loop ends (issue 22)."""

from types import SimpleNamespace

import pytest
import torch

from opensora_fast.utils._ckpt_gather import BucketGather


class _Work:
    def wait(self) -> None:
        pass


class _CopyStream:
    """Stands in for the CUDA copy stream: counts synchronize() calls."""

    def __init__(self) -> None:
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


def _gather(n_buckets: int, fail_at, monkeypatch) -> BucketGather:
    """A staged BucketGather whose collectives and steps are stubs (no process
    group); its step raises at bucket ``fail_at`` after "queuing" its copies."""
    g = BucketGather.__new__(BucketGather)
    g.plan = SimpleNamespace(n_buckets=n_buckets, staging=True, device=torch.device("cpu"))
    g.copy_stream = _CopyStream()
    g.steps = []
    monkeypatch.setattr(g, "start", lambda k: (_Work(), None, 0), raising=False)

    def step(k, rbuf, used):
        g.steps.append(k)
        if k == fail_at:
            raise RuntimeError("injected failure in bucket step")
        return g.start(k + 1) if k + 1 < n_buckets else None

    monkeypatch.setattr(g, "_step_staged", step, raising=False)
    return g


def test_gather_drains_the_copy_stream_when_a_step_raises(monkeypatch):
    g = _gather(4, 1, monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        g.run("gather", False)
    assert g.steps == [0, 1]
    assert g.copy_stream.syncs == 1  # bucket 0's copies may still read the staging buffers


def test_gather_drains_the_copy_stream_when_a_collective_raises(monkeypatch):
    g = _gather(3, None, monkeypatch)

    class _Failing(_Work):
        def wait(self) -> None:
            raise RuntimeError("injected collective failure")

    calls = []

    def start(k):
        calls.append(k)
        return (_Failing() if k == 2 else _Work()), None, 0

    monkeypatch.setattr(g, "start", start, raising=False)
    with pytest.raises(RuntimeError, match="injected collective failure"):
        g.run("gather", False)
    assert g.steps == [0, 1] and g.copy_stream.syncs == 1


def test_gather_without_failure_drains_once_more(monkeypatch):
    g = _gather(3, None, monkeypatch)
    g.run("gather", False)
    assert g.steps == [0, 1, 2] and g.copy_stream.syncs == 1


def test_cpu_gather_has_no_copy_stream_to_drain():
    g = BucketGather.__new__(BucketGather)
    g.copy_stream = None
    g._drain()  # nothing queued on the CPU: a no-op
