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


def get_batch_loss(model_pred: torch.Tensor, v_t: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's flow-matching loss, step by step.

    Without masks: ``F.mse_loss(pred.float(), v_t.float())``. With masks
    ``[B, T, H, W]``, inputs are packed ``b (t h w) (c ph pw)`` with patch 2;
    per sample, frame 0 is dropped when ``m[0] == 1`` and no interior frame is 1,
    the last frame likewise; the per-sample means are averaged over B.
    """
    import torch.nn.functional as F

    if masks is None:
        return F.mse_loss(model_pred.float(), v_t.float(), reduction="mean")
    T, H, W = masks.shape[-3:]
    m = masks[:, :, 0, 0]
    h, w, ph, pw = H // 2, W // 2, 2, 2

    def unpack(x):  # b (t h w) (c ph pw) -> b c t (h ph) (w pw)
        B = x.shape[0]
        c = x.shape[-1] // (ph * pw)
        x = x.reshape(B, T, h, w, c, ph, pw).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, c, T, h * ph, w * pw)

    pred, target = unpack(model_pred), unpack(v_t)
    total = 0
    for i in range(pred.shape[0]):
        p, t = pred[i], target[i]
        interior = bool((m[i][1:-1] == 1).any())
        if m[i][0] == 1 and not interior:
            p, t = p[:, 1:], t[:, 1:]
        if m[i][-1] == 1 and not interior:
            p, t = p[:, :-1], t[:, :-1]
        total = total + F.mse_loss(p.float(), t.float(), reduction="mean")
    return total / pred.shape[0]
