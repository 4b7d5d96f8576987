"""The CUDA review's fixes and the GPU tests it found missing (issue 22): the
default arch list and what ``info`` says of it, the small-table switch from the
environment, pinned destinations of ``unpad_`` (the pinned allocator's record,
registered host memory), ops on a second device, > 128 conditioning sources,
``unpad_`` past 2^31 elements, graph capture and side streams, edge shapes.
CUDA tests are marked ``cuda`` (skipped without a GPU); where a case can run on
the CPU it runs there too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import opensora_fast
from opensora_fast import _ext, ops, reference
from opensora_fast.__main__ import main as cli_main

OP = torch.ops.opensora_fast
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes on the CPU (any dtype, 0-dim included)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (msg, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(_bytes(a), _bytes(b)), msg


def _native_ext() -> None:
    if not _ext.HAS_NATIVE:
        pytest.skip(f"no native extension: {_ext._IMPORT_ERROR}")


# ------------------------------------------------------- arch list and info


def _arch_key(a: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)", a)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def test_default_arch_list_carries_ptx_for_its_newest_arch():
    # SASS only (the old "8.0;9.0") fails on Blackwell with "no kernel image";
    # PTX of the newest arch is JIT-compiled by newer GPUs.
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = re.search(r"^export TORCH_CUDA_ARCH_LIST \?= (\S+)$", f.read(), re.M).group(1)
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    setup_default = re.search(r'^DEFAULT_CUDA_ARCHS = "([^"]+)"', text, re.M).group(1)
    assert 'setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)' in text
    assert make == setup_default
    archs = setup_default.split(";")
    newest = max(archs, key=lambda a: _arch_key(a))
    assert newest.endswith("+PTX"), setup_default


def _expected_sass_ptx(archs: str) -> tuple[str, str]:
    """From torch's own -gencode flags for ``archs`` (the build's source of truth)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        flags = _get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    codes = [c for f in flags for m in re.findall(r",code=\[?([\w,]+)", f) for c in m.split(",")]

    def arch(c: str) -> str:
        d = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", c)
        return f"{d.group(1)}.{d.group(2)}{d.group(3)}"

    def join(prefix: str) -> str:
        return ";".join(sorted({arch(c) for c in codes if c.startswith(prefix)}, key=_arch_key))

    return join("sm_"), join("compute_")


def test_info_names_the_archs_with_sass_and_with_ptx(capsys):
    _native_ext()
    assert cli_main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert cli_main(["info"]) == 0
    lines = {}
    for ln in capsys.readouterr().out.splitlines():
        key, _, value = ln.partition(" ")
        lines[key] = value.strip()
    if not data["cuda_kernels"]:
        assert data["cuda_sass"] == data["cuda_ptx"] == ""
        return
    want = _expected_sass_ptx(data["cuda_archs"])
    assert (data["cuda_sass"], data["cuda_ptx"]) == want, data["cuda_archs"]
    assert want[0]  # every build carries machine code for some arch
    assert lines["cuda_sass"] == want[0] and lines["cuda_ptx"] == want[1]


def test_arch_code_is_unknown_for_a_record_of_another_build(monkeypatch):
    class Meta:
        CUDA_ARCHS, CUDA_SASS, CUDA_PTX = "8.0;9.0+PTX", "8.0;9.0", "9.0"

    monkeypatch.setitem(sys.modules, "opensora_fast._build_meta", Meta)
    monkeypatch.setattr(opensora_fast, "_build_meta", Meta, raising=False)
    assert _ext._arch_code("8.0;9.0+PTX") == {"cuda_sass": "8.0;9.0", "cuda_ptx": "9.0"}
    assert _ext._arch_code("8.0_9.0+PTX") == {"cuda_sass": "8.0;9.0", "cuda_ptx": "9.0"}  # _C's separators
    assert _ext._arch_code("9.0") == {"cuda_sass": "?", "cuda_ptx": "?"}
    assert _ext._arch_code("") == {"cuda_sass": "", "cuda_ptx": ""}


# ------------------------------------------- the small-table switch from the environment


def test_env_flag_values(monkeypatch):
    for raw, want in (("", False), ("0", False), ("off", False), ("1", True), (" TRUE ", True), ("yes", True)):
        monkeypatch.setenv("OSF_TEST_FLAG", raw)
        assert _ext._env_flag("OSF_TEST_FLAG") is want, raw
    monkeypatch.setenv("OSF_TEST_FLAG", "2")
    with pytest.raises(ValueError, match="OSF_TEST_FLAG must be 0 or 1"):
        _ext._env_flag("OSF_TEST_FLAG")


def _import_and_read_switch(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENSORA_FAST_FORCE_SMALL_TABLES=value)
    env.pop("OPENSORA_FAST_BACKEND", None)
    code = "import torch, opensora_fast; print(torch.ops.opensora_fast._force_small_tables(False))"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_force_small_tables_from_the_environment_at_import():
    _native_ext()
    # in this process: as the environment says (gpu_check.sh runs the CUDA tests with it set)
    here = _ext._env_flag("OPENSORA_FAST_FORCE_SMALL_TABLES")
    prev = OP._force_small_tables(here)
    OP._force_small_tables(prev)
    assert prev is here
    other = "0" if here else "1"
    r = _import_and_read_switch(other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(not here)  # the switch's value right after import


def test_force_small_tables_bad_value_fails_import_clearly():
    r = _import_and_read_switch("sometimes")
    assert r.returncode != 0
    assert "OPENSORA_FAST_FORCE_SMALL_TABLES must be 0 or 1" in r.stderr


# ----------------------------------------------------------- every op's kernels


@pytest.mark.cuda
def test_the_build_has_a_cuda_kernel_for_every_op():
    # a CPU-only build would otherwise pass the CUDA tests through the references
    _native_ext()
    assert opensora_fast.build_info()["cuda_kernels"] is True
    for name in _ext.registered_ops():
        op = name.split("::", 1)[1]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), op


def _unpad_case(world: int, shapes: list, dtype: torch.dtype, g: torch.Generator):
    """(gathered [world, bucket], offset, shard, begin, count) with each tensor's
    shards side by side (model_sharding's zero padding included)."""
    numels = [torch.Size(s).numel() for s in shapes]
    shard = [-(-n // world) for n in numels]
    offset = [sum(shard[:i]) for i in range(len(shard))]
    gathered = (torch.randn(world, sum(shard), generator=g) * 50).to(dtype)
    return gathered, offset, shard, [0] * len(shard), list(shard)


def _all_ops(device: str) -> dict:
    """Every op once on ``device`` (inputs from a fixed seed); results on the CPU."""
    g = torch.Generator().manual_seed(21)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    res = {}
    sizes = (1, 4099, 70001)
    ema = [r(n, dtype=torch.bfloat16) for n in sizes]
    src = [r(n) for n in sizes]
    OP.ema_update_(ema, src, 0.999, False, 0)
    OP.ema_update_(ema, src, 0.999, True, 5)
    res["ema_update_"] = ema
    p, t = r(3, 3001, 7), r(3, 3001, 7)
    rg = torch.tensor([[0, 3001], [5, 2999], [1, 1]], device=device)
    res["masked_mse"] = [OP.masked_mse(p, t, rg), OP.masked_mse_backward(torch.tensor(0.5, device=device), p, t, rg)]
    mask = (torch.rand(300, 33, generator=g) < 0.3).to(device)
    res["loss_ranges"] = [OP.loss_ranges(mask, 7, True), OP.loss_ranges(mask, 7, False)]
    srcs = [r(5, 10, 13, 11), r(5, 10, 13, 11, dtype=torch.bfloat16)]
    plan = [0, 0, 9, 0, 1, 1, 0, 1, 1, 0, 1, 8, 1, 0, 3, 2, 2, 3, 1, 4, 2, 6, 2, 0, 0]
    res["condition"] = list(OP.condition(r(3, 5, 9, 13, 11), srcs, plan))
    cond = torch.full((3, 6, 9, 13, 11), 7.0, device=device)
    OP.condition_cat_(cond, srcs, plan)
    res["condition_cat_"] = [cond]
    shapes = [(), (1,), (5, 3), (40000,)] + [(17,)] * 40
    gathered, off, sh, bg, ct = _unpad_case(3, shapes, torch.float32, g)
    dev_out = [torch.zeros(s, device=device) for s in shapes]
    OP.unpad_(gathered.to(device), dev_out, off, sh, bg, ct)
    res["unpad_"] = dev_out
    if device != "cpu":
        pinned = [torch.zeros(s).pin_memory() for s in shapes]
        OP.unpad_(gathered.to(device), pinned, off, sh, bg, ct)
        torch.cuda.current_stream(torch.device(device)).synchronize()
        res["unpad_ pinned"] = pinned
    params = [r(n) for n in (5, 4099, 33)]
    grads = [r(n) for n in (5, 4099, 33)]
    m = [r(n) * 0.1 for n in (5, 4099, 33)]
    v = [r(n).square() * 0.01 for n in (5, 4099, 33)]
    steps = [torch.tensor(3.0) for _ in params]
    twins = [r(n, dtype=torch.bfloat16) for n in (5, 4099, 33)]
    ops.adamw_ema_(
        params, grads, m, v, [], steps, [3], [1e-3], [0.9], [0.999], [1e-8], [0.01], [False], [False],
        twins, params, 0.999, stochastic=True, seed=3,
    )  # fmt: skip
    res["adamw_ema_"] = params + m + v + twins + steps
    return {k: [x.cpu() for x in xs] for k, xs in res.items()}


@pytest.mark.cuda
def test_every_op_on_a_second_device_from_its_side_stream():
    """Tensors on cuda:1, cuda:0 current, a side stream of cuda:1 current there:
    each op must run on cuda:1's current stream and leave cuda:0 current. cuda:0's
    results (its kernels are checked against the CPU elsewhere) are the oracle."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    want = _all_ops("cuda:0")
    before = torch.cuda.current_stream(1)
    side = torch.cuda.Stream(device=1)
    torch.cuda.set_stream(side)  # cuda:1's current stream (it also makes cuda:1 current)
    torch.cuda.set_device(0)
    try:
        assert torch.cuda.current_stream(1) == side
        got = _all_ops("cuda:1")  # inputs made and results read on `side` too
        assert torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_stream(before)
        torch.cuda.set_device(0)
    assert want.keys() == got.keys()
    for k in want:
        for i, (a, b) in enumerate(zip(want[k], got[k])):
            assert_same_bits(b, a, f"{k}[{i}] on cuda:1")


# --------------------------------------------------- conditioning: > 128 sources


def _many_sources_case(B: int = 64, C: int = 4, T: int = 5):
    """B samples x 3 references: one source per conditioned frame (3B sources)."""
    g = torch.Generator().manual_seed(12)
    dts = (torch.float32, torch.bfloat16, torch.float16)
    srcs = [torch.randn(C, 3, 6, 7, generator=g).to(dts[i % 3]) for i in range(3 * B)]
    plan = [v for b in range(B) for v in (b, 0, 1, 3 * b, 0, b, 2, 1, 3 * b + 1, 1, b, 4, 1, 3 * b + 2, 2)]
    z = torch.randn(B, C, T, 6, 7, generator=g)
    return z, srcs, plan


@pytest.mark.parametrize("device", DEVICES)
def test_condition_with_192_sources_equals_the_cpu(device):
    z, srcs, plan = _many_sources_case()
    want_m, want_z = reference.condition.condition(z, srcs, plan)
    want_cat = torch.full((64, 5, 5, 6, 7), 3.0)
    reference.condition.condition_cat_(want_cat, srcs, plan)
    if device == "cpu":
        _native_ext()
    got_m, got_z = OP.condition(z.to(device), [s.to(device) for s in srcs], plan)
    cat = torch.full((64, 5, 5, 6, 7), 3.0, device=device)
    OP.condition_cat_(cat, [s.to(device) for s in srcs], plan)
    assert_same_bits(got_m, want_m, "masks")
    assert_same_bits(got_z, want_z, "masked z")
    assert_same_bits(cat, want_cat, "cond")
    if device == "cuda":  # and the CPU kernel, bit for bit
        cpu_m, cpu_z = OP.condition(z, srcs, plan)
        assert_same_bits(got_z, cpu_z, "masked z vs CPU kernel")


# ---------------------------------------------------------- unpad_ past 2^31


@pytest.mark.cuda
@pytest.mark.slow
def test_unpad_over_2_pow_31_uint8_elements():
    shard = 2**30 + 8
    numel = 2 * shard - 3  # 2^31 + 13; the last 3 columns of row 1 are padding
    need = 4 * numel + (1 << 30)  # gathered, out, the compare's bool and headroom
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(
            f"not enough GPU memory for unpad_ past 2^31: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
        )
    gathered = torch.zeros(2, shard, dtype=torch.uint8, device="cuda")
    u8 = lambda *v: torch.tensor(v, dtype=torch.uint8, device="cuda")  # noqa: E731
    gathered[0, :3] = u8(7, 8, 9)
    gathered[1, shard - 8 : shard - 3] = u8(1, 2, 3, 4, 5)  # the last valid elements
    gathered[1, shard - 3 :] = 99  # padding: never written
    c0 = 2**31 - shard  # row 1's column holding element 2^31
    gathered[1, c0 - 2 : c0 + 4] = u8(11, 12, 13, 14, 15, 16)
    out = torch.full((numel,), 200, dtype=torch.uint8, device="cuda")
    OP.unpad_(gathered, [out], [0], [shard], [0], [shard])
    del gathered
    assert int((out == 200).sum()) == 0  # every element written
    assert int((out == 99).sum()) == 0
    assert int(out.count_nonzero()) == 3 + 5 + 6
    assert out[:3].tolist() == [7, 8, 9]
    assert out[-5:].tolist() == [1, 2, 3, 4, 5]
    assert out[2**31 - 2 : 2**31 + 4].tolist() == [11, 12, 13, 14, 15, 16]


# -------------------------------------------- unpad_: pinned and registered destinations


@pytest.mark.cuda
def test_unpad_pinned_destination_is_held_by_the_allocator_until_the_stream_is_done():
    # As copy_(non_blocking=True): a pinned destination freed before the kernel
    # ran must not be handed to the next pinned allocation.
    n = 1 << 20
    gathered = torch.randn(1, n, device="cuda")
    out = torch.zeros(n).pin_memory()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # holds the stream ~0.5 s: the kernel is still queued below
    OP.unpad_(gathered, [out], [0], [n], [0], [n])
    ptr = out.data_ptr()
    del out
    again = torch.empty(n).pin_memory()
    assert again.data_ptr() != ptr, "the pinned block was reused while the kernel could still write it"
    torch.cuda.synchronize()


def _register(t: torch.Tensor) -> None:
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    assert int(rc) == 0, rc


@pytest.mark.cuda
@pytest.mark.parametrize("force", [False, True], ids=["as-the-device-says", "device-pointers-forced"])
def test_unpad_into_registered_and_allocated_pinned_memory(force):
    # cudaHostRegister memory (torch's pinned_use_cuda_host_register, or a user's
    # own) is addressed through its device pointer where the device cannot use
    # the host one; forcing that lookup exercises the path on any GPU.
    g = torch.Generator().manual_seed(5)
    shapes = [(), (1,), (5, 3), (40001,)] + [(17,)] * 40
    gathered, off, sh, bg, ct = _unpad_case(3, shapes, torch.float32, g)
    want = [torch.zeros(s) for s in shapes]
    OP.unpad_(gathered, want, off, sh, bg, ct)
    numels = [torch.Size(s).numel() for s in shapes]
    buf = torch.full((sum(numels) + 1,), -1.0)  # plain host memory, then registered
    _register(buf)
    prev = OP._force_device_pointers(force)
    try:
        assert buf.is_pinned()
        starts = [1 + sum(numels[:i]) for i in range(len(numels))]  # a 4-byte offset: views inside the range
        registered = [buf[s : s + n].view(shape) for s, n, shape in zip(starts, numels, shapes)]
        allocated = [torch.full(s, -1.0).pin_memory() for s in shapes]
        dev = gathered.cuda()
        OP.unpad_(dev, registered, off, sh, bg, ct)
        OP.unpad_(dev, allocated, off, sh, bg, ct)
        torch.cuda.synchronize()
        for i, (w, a, b) in enumerate(zip(want, registered, allocated)):
            assert_same_bits(a, w, f"registered out[{i}]")
            assert_same_bits(b, w, f"pinned out[{i}]")
        assert float(buf[0]) == -1.0  # nothing before the first destination
    finally:
        OP._force_device_pointers(prev)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


# ------------------------------------------- graph capture and side streams


@pytest.mark.cuda
def test_unpad_graph_capture_replays_and_side_stream_without_sync():
    g = torch.Generator().manual_seed(8)
    shapes = [(), (2,), (5, 3), (3 * 32768 + 7,)] + [(9,)] * 300  # several tables
    gathered, off, sh, bg, ct = _unpad_case(4, shapes, torch.bfloat16, g)
    dev = gathered.cuda()
    outs = [torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OP.unpad_(dev, outs, off, sh, bg, ct)
    for _ in range(2):  # new contents of the captured buffer each replay
        fresh = (torch.randn(gathered.shape, generator=g) * 50).to(torch.bfloat16)
        dev.copy_(fresh)
        graph.replay()
        want = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
        OP.unpad_(fresh, want, off, sh, bg, ct)
        torch.cuda.synchronize()
        for i, (o, w) in enumerate(zip(outs, want)):
            assert_same_bits(o, w, f"replay out[{i}]")
    # a side stream, into device and pinned memory, no host sync
    dev_out = [torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    pinned = [torch.zeros(s, dtype=torch.bfloat16).pin_memory() for s in shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            OP.unpad_(dev, dev_out, off, sh, bg, ct)
            OP.unpad_(dev, pinned, off, sh, bg, ct)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    want = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    OP.unpad_(dev.cpu(), want, off, sh, bg, ct)
    for i, (a, b, w) in enumerate(zip(dev_out, pinned, want)):
        assert_same_bits(a, w, f"side stream out[{i}]")
        assert_same_bits(b, w, f"side stream pinned out[{i}]")


@pytest.mark.cuda
def test_loss_ranges_graph_capture_replays_and_side_stream():
    g = torch.Generator().manual_seed(9)
    full = (torch.rand(300, 33, 3, generator=g) < 0.3).float().cuda()
    m = full[:, :, 1]  # a strided view
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [OP.loss_ranges(m, 7, up) for up in (True, False)]
    for _ in range(2):
        full.copy_((torch.rand(300, 33, 3, generator=g) < 0.3).float())
        graph.replay()
        torch.cuda.synchronize()
        for up, r in zip((True, False), got):
            assert torch.equal(r.cpu(), OP.loss_ranges(m.cpu(), 7, up)), up
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            on_side = [OP.loss_ranges(m, 7, up) for up in (True, False)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for up, r in zip((True, False), on_side):
        assert torch.equal(r.cpu(), OP.loss_ranges(m.cpu(), 7, up)), up


# ------------------------------------------------------------------ edge shapes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,L,D", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_loss_with_an_empty_dimension_forward_and_backward(device, B, L, D):
    _native_ext()
    p = torch.randn(B, L, D, device=device, requires_grad=True)
    t = torch.randn(B, L, D, device=device)
    r = torch.tensor([[0, L]] * B, dtype=torch.long).view(B, 2).to(device)
    loss = ops.masked_mse(p, t, r)
    loss.backward(torch.tensor(0.5, device=device))
    walk_loss, walk_grad = OP._masked_mse_grid_walk(torch.tensor(0.5), p.detach().cpu(), t.cpu(), r.cpu())
    assert loss.dtype == walk_loss.dtype and loss.shape == ()
    assert torch.isnan(loss) and torch.isnan(walk_loss)  # a mean over nothing, as upstream's
    assert p.grad.shape == (B, L, D) and p.grad.device == p.device
    assert_same_bits(p.grad, walk_grad, "grad")
    raw = OP.masked_mse_backward(torch.tensor(0.5, device=device), p.detach(), t, r)
    assert_same_bits(raw, walk_grad, "masked_mse_backward")


@pytest.mark.parametrize("B,L,D", [(2, 0, 3), (2, 5, 0)])
def test_loss_reference_with_an_empty_dimension_forward_and_backward(B, L, D):
    p = torch.randn(B, L, D, requires_grad=True)
    loss = reference.masked_mse.masked_mse(p, torch.randn(B, L, D), torch.tensor([[0, L]] * B))
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, p)
    assert g.shape == (B, L, D)


def test_loss_reference_with_no_samples_backward():
    p = torch.randn(0, 5, 3, requires_grad=True)
    loss = reference.masked_mse.masked_mse(p, torch.randn(0, 5, 3), torch.zeros(0, 2, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, p)
    assert g.shape == (0, 5, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ema_lists_of_only_empty_tensors(device, stochastic):
    _native_ext()
    ema = [torch.zeros(0, device=device), torch.zeros(0, 3, dtype=torch.bfloat16, device=device)]
    src = [torch.zeros(0, device=device), torch.zeros(0, 3, device=device)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        OP.ema_update_(ema, src, 0.9, stochastic, 1)
        ops.ema_update_(ema, src, 0.9)
        OP.ema_update_([], [], 0.9, stochastic, 1)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    reference.ema.ema_update_([e.cpu() for e in ema], [s.cpu() for s in src], 0.9)
    assert [tuple(e.shape) for e in ema] == [(0,), (0, 3)]


@pytest.mark.parametrize("device", DEVICES)
def test_condition_cat_with_no_latent_channels(device):
    # C = 0: cond is [B, 1, T, H, W], the masks only
    _native_ext()
    srcs = [torch.randn(0, 2, 4, 5)]
    plan = [0, 0, 1, 0, 0, 1, 1, 2, 0, 0]
    want = torch.full((2, 1, 3, 4, 5), -1.0)
    reference.condition.condition_cat_(want, srcs, plan)
    got = torch.full((2, 1, 3, 4, 5), -1.0, device=device)
    OP.condition_cat_(got, [s.to(device) for s in srcs], plan)
    assert_same_bits(got, want)
    assert want[:, 0, :, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    m, masked = OP.condition(torch.randn(2, 0, 3, 4, 5, device=device), [s.to(device) for s in srcs], plan)
    assert_same_bits(m, want)
    assert masked.shape == (2, 0, 3, 4, 5)
