"""Reference ports of ``opensora.utils.train`` functions (upstream semantics)."""
from __future__ import annotations

import torch


@torch.no_grad()
def update_ema(
    ema_model: torch.nn.Module,
    model: torch.nn.Module,
    optimizer=None,
    decay: float = 0.9999,
    sharded: bool = True,
) -> None:
    """Upstream's EMA step, one pair at a time.

    For every parameter of ``model`` except ``pos_embed`` and those without
    ``requires_grad``: ``ema = ema * decay + src * (1 - decay)`` as
    ``ema.mul_(decay).add_(src, alpha=1 - decay)``, where ``src`` is the
    parameter itself, or, when ``sharded`` and the parameter is not fp32, its
    fp32 master shard from ``optimizer.get_working_to_master_map()``.
    """
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        if name == "pos_embed" or not param.requires_grad:
            continue
        if sharded and param.data.dtype != torch.float32:
            src = optimizer.get_working_to_master_map()[id(param)].data
        else:
            src = param.data
        ema_params[name].mul_(decay).add_(src, alpha=1 - decay)
