"""The demo's training and sampling loop: step for step the shape of upstream's
``scripts/diffusion/train.py`` (EMA sharded at start; per step
prepare_visual_condition -> pack -> get_res_lin_function/time_shift ->
prepare_ids -> dropout_condition -> forward -> get_batch_loss -> backward ->
optimizer step -> update_ema; every few steps CheckpointIO.save with the EMA and
master weights), then an i2v sampling pass from the saved EMA, with every phase
timed. One :class:`~opensora_fast.demo.sides.Side` decides which implementation
of upstream's helpers runs."""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import math
import os
import random
import shutil
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from ..utils.ckpt import record_model_param_shape
from ..utils.sampling import get_res_lin_function, get_schedule, pack, prepare_ids, time_shift
from ..utils.train import dropout_condition
from .model import MMDiT, MMDiTConfig
from .sides import EMA_DECAY, Side, Size
from .vae import ToyCausalVAE

PHASES = ("data", "condition", "encode", "inputs", "forward", "loss", "backward", "optimizer", "ema", "checkpoint")
UTILITY = ("condition", "loss", "ema", "checkpoint")  # what opensora_fast replaces
SIGMA_MIN = 1e-5
DROPOUT = 0.1
DTYPE = torch.bfloat16
SAMPLE_CONDITION_CALLS = 5


class PhaseTimer:
    """Wall time per named phase, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: Dict[str, List[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times.setdefault(name, []).append(time.perf_counter() - t0)


class PeakMemory:
    """Peak device memory (CUDA: max allocated) or peak resident set size (CPU,
    sampled every 5 ms from /proc/self/statm) while the block runs."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.base = device, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False

    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "process RSS"


def build_models(size: Size, device: torch.device, seed: int):
    """(model, vae, text stand-ins) from ``seed``: the same weights on every side."""
    torch.manual_seed(seed)
    lat = (size.frames - 1) // 4 + 1
    tokens = lat * (size.height // 16) * (size.width // 16)
    cfg = MMDiTConfig(
        in_channels=size.latent_channels * 4,
        hidden_size=size.hidden,
        num_heads=size.heads,
        depth=size.depth,
        depth_single_blocks=size.depth_single,
        context_in_dim=size.context_in_dim,
        vec_in_dim=size.vec_in_dim,
        img_tokens=tokens,
    )
    model = MMDiT(cfg).to_training_dtype(DTYPE).to(device).train()
    vae = ToyCausalVAE(size.latent_channels, size.vae_hidden).to(device, DTYPE).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 7)
    null_txt = torch.randn(1, size.txt_len, size.context_in_dim, generator=g).to(device, DTYPE)
    null_vec = torch.randn(1, size.vec_in_dim, generator=g).to(device, DTYPE)
    return model, vae, null_txt, null_vec


def make_batch(size: Size, gen: torch.Generator, device: torch.device, batch: Optional[int] = None) -> dict:
    """A smooth random video batch [B, 3, F, H, W] in [-1, 1] and text embeddings."""
    B = batch or size.batch
    coarse = torch.rand(B, 3, max(2, size.frames // 8), 4, 4, generator=gen) * 2 - 1
    video = torch.nn.functional.interpolate(coarse, size=(size.frames, size.height, size.width), mode="trilinear")
    return {
        "video": video.to(device, DTYPE),
        "text_t5": torch.randn(B, size.txt_len, size.context_in_dim, generator=gen).to(device, DTYPE),
        "text_clip": torch.randn(B, size.vec_in_dim, generator=gen).to(device, DTYPE),
    }


def ema_checksum(ema: torch.nn.Module) -> dict:
    """Sum and sum of |x| in fp64 over the EMA's parameters, and a SHA-256 of their bytes."""
    h = hashlib.sha256()
    total = absum = 0.0
    for name, p in ema.named_parameters():
        t = p.detach().cpu()
        total += t.double().sum().item()
        absum += t.double().abs().sum().item()
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return {"sum": total, "abs_sum": absum, "sha256": h.hexdigest()}


def _step_inputs(side: Side, batch: dict, size: Size, vae, cond_config: dict, null_txt, null_vec, timer):
    """Upstream's ``prepare_inputs``: condition, timesteps, text, dropout, noise."""
    device = batch["video"].device
    with torch.no_grad():
        with timer("condition"):
            x_0, cond = side.prepare_visual_condition(batch["video"], cond_config, vae)
        enc = timer.times.setdefault("encode", [])
        enc.append(vae.pop_encode_time())
        with timer("inputs"):
            masks = cond[:, 0]  # [B, T, H, W]: the frames the loss leaves out
            cond = pack(cond, patch_size=2)
            shift_alpha = get_res_lin_function()((x_0.shape[-1] * x_0.shape[-2]) // 4) * math.sqrt(x_0.shape[-3])
            t = torch.sigmoid(torch.randn((x_0.shape[0],), device=device))
            t = time_shift(shift_alpha, t).to(DTYPE)
            inp = prepare_ids(x_0, batch["text_t5"], batch["text_clip"])
            x_0 = pack(x_0, patch_size=2)
            inp["txt"] = dropout_condition(DROPOUT, inp["txt"], null_txt.expand(inp["txt"].shape[0], -1, -1))
            inp["y_vec"] = dropout_condition(DROPOUT, inp["y_vec"], null_vec)
            x_1 = torch.randn_like(x_0, dtype=torch.float32).to(device, DTYPE)
            t_rev = 1 - t
            inp["img"] = t_rev[:, None, None] * x_0 + (1 - (1 - SIGMA_MIN) * t_rev[:, None, None]) * x_1
            inp["timesteps"] = t
            inp["guidance"] = torch.full((x_0.shape[0],), 4.0, device=device, dtype=DTYPE)
            inp["cond"] = cond
    return inp, x_0, x_1, masks


class Run:
    """One side's training run, stepped from outside so that the sides can run
    in lockstep (each step of one side next to the same step of the other:
    a load that changes over the run then hits both alike)."""

    def __init__(self, side: Side, size: Size, device: torch.device, seed: int, ckpt_root: str):
        from .zero import DemoBooster

        self.side, self.size, self.device, self.seed, self.ckpt_root = side, size, device, seed, ckpt_root
        self.model, self.vae, self.null_txt, self.null_vec = build_models(size, device, seed)
        self.ema = copy.deepcopy(self.model).cpu().eval().requires_grad_(False)  # as upstream: built on the CPU
        self.ema_shape_dict = record_model_param_shape(self.ema)
        self.optimizer = side.make_optimizer(self.model)
        self.checkpoint_io = side.make_checkpoint_io()
        self.booster = DemoBooster()
        side.model_sharding(self.ema)
        self.ema = self.ema.to(device)
        if side.setup is not None:
            side.setup(self.optimizer, self.ema, self.model)
        self.cond_config = dict(size.condition_config)  # one dict for the run, as upstream's cfg.condition_config
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.timer = PhaseTimer(device)
        self.losses: List[float] = []
        self.step_s: List[float] = []
        self.saves: List[str] = []
        self._drained = True
        # the sides share Python's and torch's global RNGs: each keeps its own state
        random.seed(seed)
        torch.manual_seed(seed + 1)
        self.rng = (
            random.getstate(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        )

    @contextlib.contextmanager
    def _own_rng(self):
        random.setstate(self.rng[0])
        torch.set_rng_state(self.rng[1])
        if self.rng[2] is not None:
            torch.cuda.set_rng_state(self.rng[2], self.device)
        try:
            yield
        finally:
            self.rng = (
                random.getstate(),
                torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.rng[2] is not None else None,
            )

    def step(self, step: int) -> None:
        side, size, timer, model = self.side, self.size, self.timer, self.model
        with self._own_rng():
            t_step = time.perf_counter()
            with timer("data"):
                batch = make_batch(size, self.gen, self.device)
            inp, x_0, x_1, masks = _step_inputs(
                side, batch, size, self.vae, self.cond_config, self.null_txt, self.null_vec, timer
            )
            with timer("forward"):
                pred = model(**inp)
                v_t = (1 - SIGMA_MIN) * x_1 - x_0
            with timer("loss"):
                loss = side.get_batch_loss(pred, v_t, masks)
                self.losses.append(loss.item())
            with timer("backward"):
                loss.backward()
            with timer("optimizer"):
                self.booster.checkpoint_io.synchronize()  # as upstream: the Booster's host copies are made
                self.optimizer.step()
                self.optimizer.zero_grad()
            with timer("ema"):
                side.update_ema(self.ema, model, optimizer=self.optimizer, decay=EMA_DECAY)
            if size.ckpt_every and (step + 1) % size.ckpt_every == 0:
                with timer("checkpoint"):
                    path = self.checkpoint_io.save(
                        self.booster,
                        self.ckpt_root,
                        model=model,
                        ema=self.ema,
                        optimizer=self.optimizer,
                        epoch=0,
                        step=step + 1,
                        global_step=step + 1,
                        batch_size=size.batch,
                        actual_update_step=step + 1,
                        ema_shape_dict=self.ema_shape_dict,
                        async_io=True,
                        include_master_weights=True,
                        **side.save_kwargs,
                    )
                # the previous save is complete now (save waits for it first): keep only the newest
                for old in self.saves:
                    shutil.rmtree(old, ignore_errors=True)
                self.saves = [path]
                self._drained = False
            self.step_s.append(time.perf_counter() - t_step)

    def drain_background(self) -> None:
        """Waits for this side's background checkpoint writes (its own and the
        Booster's), timed as "background" and outside the step: in lockstep they
        would otherwise run inside the next side's timed phases."""
        if self.saves and not self._drained:
            with self.timer("background"):
                self.checkpoint_io._sync_io()
                self.booster.checkpoint_io._sync_io()
            self._drained = True

    def finish(self) -> dict:
        """Waits for the last checkpoint write, samples from it; returns every figure."""
        with self._own_rng():
            with self.timer("drain"):
                self.checkpoint_io._sync_io()
                self.booster.checkpoint_io._sync_io()
            sampling = sample(
                self.side,
                self.size,
                self.model,
                self.vae,
                self.saves[-1] if self.saves else None,
                self.ema,
                self.device,
                self.seed,
                self.timer,
            )
        return {
            "side": self.side.key,
            "label": self.side.label,
            "times": self.timer.times,
            "step_s": self.step_s,
            "losses": self.losses,
            "ema": ema_checksum(self.ema),
            "booster_s": self.booster.seconds,
            "saves": len(self.timer.times.get("checkpoint", [])),
            "sampling": sampling,
        }


def _trim_heap() -> None:
    """Gives freed heap memory back to the system (glibc), so one pass's peak RSS
    does not hide in the free lists an earlier pass left."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_lockstep(
    sides_: List[Side], size: Size, steps: int, device: torch.device, seed: int, ckpt_root: str, progress: bool = True
) -> List[dict]:
    """Every side's run, step by step in turn (the order alternating each step)."""
    from tqdm import tqdm

    runs = []
    for side in sides_:
        d = os.path.join(ckpt_root, side.key)
        os.makedirs(d, exist_ok=True)
        runs.append(Run(side, size, device, seed, d))
    gc.collect()
    gc.disable()  # as upstream's train.py
    try:
        bar = tqdm(range(steps), desc="training (" + " | ".join(s.label for s in sides_) + ")", disable=not progress)
        for step in bar:
            for r in runs if step % 2 == 0 else runs[::-1]:
                r.step(step)
                r.drain_background()
            bar.set_postfix(loss=f"{runs[0].losses[-1]:.4f}")
        results = [r.finish() for r in runs]
    finally:
        gc.enable()
    return results


def peak_memory(side: Side, size: Size, steps: int, device: torch.device, seed: int, ckpt_root: str) -> dict:
    """Peak memory of one side alone over ``steps`` steps (a separate pass: in
    lockstep the sides' memory cannot be told apart)."""
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d = os.path.join(ckpt_root, "mem-" + side.key)
    os.makedirs(d, exist_ok=True)
    with PeakMemory(device) as mem:
        r = Run(side, size, device, seed, d)
        for i in range(steps):
            r.step(i)
        r.checkpoint_io._sync_io()
        r.booster.checkpoint_io._sync_io()
        del r
    shutil.rmtree(d, ignore_errors=True)
    return {"peak_bytes": mem.peak, "base_bytes": mem.base, "kind": mem.kind(), "steps": steps}


def _load_ema_model(model, ckpt_dir: Optional[str], ema, device):
    """A full model from the saved ``ema.safetensors`` (the sharded EMA itself when
    nothing was saved: one process, so its shards are whole parameters)."""
    full = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt_dir is not None:
        from safetensors.torch import load_file

        sd = load_file(os.path.join(ckpt_dir, "ema.safetensors"))
        source = "checkpoint ema.safetensors"
    else:
        sd = {k: v.view(model.state_dict()[k].shape) for k, v in ema.state_dict().items()}
        source = "in-memory EMA"
    full.load_state_dict(sd)
    return full.to(device), source


@torch.no_grad()
def sample(side: Side, size: Size, model, vae, ckpt_dir: Optional[str], ema, device, seed: int, timer) -> dict:
    """i2v_head sampling from the EMA: references from the first frames,
    ``prepare_inference_condition``, Euler steps over upstream's schedule, decode."""
    smodel, source = _load_ema_model(model, ckpt_dir, ema, device)
    gen = torch.Generator().manual_seed(seed + 3)
    B = size.sample_batch
    batch = make_batch(size, gen, device, batch=B)
    C = size.latent_channels
    T, H, W = vae.get_latent_size(batch["video"].shape[-3:])
    ref_list = [[vae.encode(batch["video"][i : i + 1, :, :1])[0]] for i in range(B)]
    vae.pop_encode_time()
    z = torch.randn(B, C, T, H, W, generator=gen).to(device, DTYPE)
    for _ in range(SAMPLE_CONDITION_CALLS):  # one call is mostly first-call set-up: the median of a few
        with timer("sample_condition"):
            masks, masked_z = side.prepare_inference_condition(z, "i2v_head", ref_list, causal=True)
    with timer("sample_denoise"):
        inp = prepare_ids(z, batch["text_t5"], batch["text_clip"])
        cond = pack(torch.cat((masks, masked_z), dim=1), patch_size=2)
        img = inp.pop("img")
        ts = get_schedule(size.sample_steps, (H * W) // 4, T)
        for t_curr, t_prev in zip(ts[:-1], ts[1:]):
            tv = torch.full((B,), t_curr, device=device, dtype=DTYPE)
            pred = smodel(img=img, timesteps=tv, cond=cond, **inp)
            img = img + (t_prev - t_curr) * pred
        lat = img.reshape(B, T, H // 2, W // 2, C, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, H, W)
        lat = masks * masked_z + (1 - masks) * lat  # the reference frame stays
        video = vae.decode(lat)
    return {
        "source": source,
        "latent_sum": lat.double().sum().item(),
        "video": video[0].cpu(),
        "frames": int(video.shape[2]),
    }


def summarize(run: dict, ckpt_every: int, warmup: Optional[int] = None) -> dict:
    """Per-phase figures of one run: medians per step with the first ``warmup``
    steps left out (default 2 of more than 4 steps, else 1: the first steps pay
    one-time set-up, on whichever side runs a shape first); checkpoints as the
    mean per save, all saves counted (the first one allocates the host buffers,
    on every side). The utility figures are per step, a save counted as
    1/ckpt_every of it: medians resist the spikes a shared machine puts in single steps."""
    n_steps = len(run["step_s"])
    if warmup is None:
        warmup = 2 if n_steps > 4 else 1
    phases = {}
    for name in PHASES + ("background", "drain", "sample_condition", "sample_denoise"):
        ts = run["times"].get(name, [])
        kept = (
            ts
            if name in ("checkpoint", "background", "drain", "sample_condition", "sample_denoise")
            else (ts[warmup:] if len(ts) > warmup else ts)
        )
        phases[name] = {
            "total_s": sum(kept),
            "calls": len(kept),
            "median_ms": statistics.median(kept) * 1e3 if kept else 0.0,
            "mean_ms": statistics.fmean(kept) * 1e3 if kept else 0.0,
        }
    steps_kept = run["step_s"][warmup:] if n_steps > warmup else run["step_s"]
    per_save = phases["checkpoint"]["mean_ms"]
    booster_per_save = run["booster_s"] * 1e3 / max(run["saves"], 1)
    share = 1.0 / ckpt_every if ckpt_every else 0.0
    utility = sum(phases[p]["median_ms"] for p in UTILITY if p != "checkpoint") + per_save * share
    return {
        "phases": phases,
        "warmup_steps": warmup,
        "timed_steps": len(steps_kept),
        "step_median_ms": statistics.median(steps_kept) * 1e3 if steps_kept else 0.0,
        "steps_total_s": sum(steps_kept),
        "booster_ms_per_save": booster_per_save,
        "utility_ms_per_step": utility,
        "utility_without_booster_ms_per_step": utility - booster_per_save * share,
        "utility_own_ms_per_step": utility - booster_per_save * share - phases["encode"]["median_ms"],
    }
