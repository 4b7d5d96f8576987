"""The demo's sizes and the sides it compares: the same loop run through the
upstream-faithful references and through opensora_fast (and, when
``opensora_fast.optim.FusedAdamW`` is there, with the fused optimizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .zero import ShardedMasterOptimizer, fused_optimizer_class


@dataclass(frozen=True)
class Size:
    """One demo size: the batch, the video and the model."""

    name: str
    batch: int
    frames: int
    height: int
    width: int
    latent_channels: int
    hidden: int
    heads: int
    depth: int
    depth_single: int
    txt_len: int
    context_in_dim: int
    vec_in_dim: int
    vae_hidden: int
    steps: int
    ckpt_every: int
    sample_steps: int
    sample_batch: int
    condition_config: Dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"batch {self.batch}, video {self.frames}x{self.height}x{self.width}, latent C={self.latent_channels}, "
            f"d={self.hidden}, {self.depth} double + {self.depth_single} single blocks"
        )


_CONDITIONS = {"t2v": 1.0, "i2v_head": 3.0, "i2v_tail": 1.0, "i2v_loop": 1.0, "v2v_head": 1.0, "v2v_tail": 1.0}

SIZES: Dict[str, Size] = {
    # the smoke test: under a minute on 2 CPU cores (v2v modes dropped: too few latent frames)
    "tiny": Size(
        "tiny",
        batch=4,
        frames=9,
        height=32,
        width=32,
        latent_channels=4,
        hidden=64,
        heads=2,
        depth=1,
        depth_single=2,
        txt_len=8,
        context_in_dim=32,
        vec_in_dim=16,
        vae_hidden=32,
        steps=6,
        ckpt_every=3,
        sample_steps=3,
        sample_batch=2,
        condition_config=dict(_CONDITIONS),
    ),
    # the default: a few minutes on 2 CPU cores; 11 latent frames, so v2v_head/tail are drawn too
    "small": Size(
        "small",
        batch=8,
        frames=41,
        height=64,
        width=64,
        latent_channels=16,
        hidden=192,
        heads=3,
        depth=4,
        depth_single=8,
        txt_len=32,
        context_in_dim=128,
        vec_in_dim=64,
        vae_hidden=64,
        steps=20,
        ckpt_every=5,
        sample_steps=8,
        sample_batch=2,
        condition_config=dict(_CONDITIONS),
    ),
    # one H100/H200: head dim 128 as the 11B model
    "gpu": Size(
        "gpu",
        batch=8,
        frames=65,
        height=256,
        width=256,
        latent_channels=16,
        hidden=768,
        heads=6,
        depth=4,
        depth_single=8,
        txt_len=128,
        context_in_dim=512,
        vec_in_dim=256,
        vae_hidden=256,
        steps=30,
        ckpt_every=10,
        sample_steps=16,
        sample_batch=2,
        condition_config=dict(_CONDITIONS),
    ),
}

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-15, 0.0
# upstream's default is 0.9999, at which a bf16 EMA barely moves in a short run
# (so its checksum would agree whatever the EMA did); 0.99 makes it move
EMA_DECAY = 0.99


@dataclass
class Side:
    """What one run calls: upstream's helper names bound to one implementation."""

    key: str
    label: str
    update_ema: Callable
    get_batch_loss: Callable
    prepare_visual_condition: Callable
    prepare_inference_condition: Callable
    model_sharding: Callable
    make_checkpoint_io: Callable[[], object]
    make_optimizer: Callable[[nn.Module], object]
    # called once the EMA is sharded: (optimizer, ema, model)
    setup: Optional[Callable[[object, nn.Module, nn.Module], None]] = None
    # extra keyword arguments of every CheckpointIO.save
    save_kwargs: Dict[str, object] = field(default_factory=dict)


def _adamw(params: List[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def upstream_side() -> Side:
    import importlib

    from .upstream_ckpt import UpstreamCheckpointIO

    rc, rcond, rt = (
        importlib.import_module(f"opensora_fast.reference.{m}")
        for m in ("upstream.ckpt", "upstream.condition", "upstream.train")
    )

    return Side(
        "upstream",
        "upstream-faithful",
        rt.update_ema,
        rt.get_batch_loss,
        rcond.prepare_visual_condition_causal,
        rcond.prepare_inference_condition,
        rc.model_sharding,
        UpstreamCheckpointIO,
        lambda m: ShardedMasterOptimizer(m, _adamw),
    )


def fast_side() -> Side:
    from ..utils import ckpt, inference, train

    return Side(
        "fast",
        "opensora_fast",
        train.update_ema,
        train.get_batch_loss,
        train.prepare_visual_condition_causal,
        inference.prepare_inference_condition,
        ckpt.model_sharding,
        ckpt.CheckpointIO,
        lambda m: ShardedMasterOptimizer(m, _adamw),
    )


def fused_side():
    """The third column, or None while ``opensora_fast.optim.FusedAdamW`` is absent:
    FusedAdamW steps the master shards and, attached to the EMA, the EMA too in
    the same pass, so its EMA work is timed inside "optimizer" and its "ema"
    phase only finds the step taken; checkpoints are gather-free
    (``CheckpointIO.save(parallel=True)``: each rank writes its own bytes; in
    one process, the demo's case, there is no gather to avoid and the save
    writes from host buffers in the background, as the fast side's)."""
    cls = fused_optimizer_class()
    if cls is None:
        return None
    from ..optim import attach_ema

    def setup(optimizer, ema, model):
        attach_ema(optimizer, ema, model, decay=EMA_DECAY)

    side = fast_side()
    side.key, side.label = "fused", "opensora_fast + fused optimizer + gather-free checkpoints"
    side.save_kwargs = {"parallel": True}
    side.make_optimizer = lambda m: ShardedMasterOptimizer(
        m, lambda ps: cls(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    )
    side.setup = setup  # update_ema (the fast side's) then finds the step taken
    return side


def sides() -> List[Side]:
    out = [upstream_side(), fast_side()]
    fused = fused_side()
    if fused is not None:
        out.append(fused)
    return out
