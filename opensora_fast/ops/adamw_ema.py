"""The fused multi-tensor AdamW + EMA op (csrc/adamw_ema/): wrapper and fake."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ..reference import adamw_ema as _ref
from ._registry import explain_dispatch_refusal, has_op, pick, register_fake
from .ema import _as_int64, draw_seed


def _floats(name: str, values: Sequence) -> list[float]:
    out = []
    for g, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"adamw_ema_: {name}[{g}] must be a real number, got {type(x).__name__}")
        out.append(float(x))
    return out


def _flags(name: str, values: Sequence) -> list[int]:
    out = []
    for g, x in enumerate(values):
        if not isinstance(x, (bool, int)):
            raise TypeError(f"adamw_ema_: {name}[{g}] must be a bool, got {type(x).__name__}")
        out.append(int(x))
    return out


def adamw_ema_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    amsgrad: Sequence[bool],
    maximize: Sequence[bool],
    ema: Sequence[torch.Tensor] = (),
    ema_src: Sequence[torch.Tensor] = (),
    decay: float = 0.9999,
    *,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """One AdamW step (torch's ``AdamW(foreach=True)`` arithmetic) over fp32
    masters, then, in the same pass, ``ema[j] = ema[j] * decay + ema_src[j] * (1 - decay)``.

    * ``params``, ``grads``, ``exp_avgs``, ``exp_avg_sqs``, ``steps``: one per
      parameter, ordered by group; ``group_sizes`` says how many each group
      has, and ``lr`` .. ``maximize`` hold one value per group.
      ``max_exp_avg_sqs``: one per parameter of the amsgrad groups. ``steps``
      are torch's ``state["step"]`` (fp32 scalars on the CPU): each is
      incremented, then sets its tensor's bias corrections, as in torch.
    * An ``ema_src`` that is one of the params (the same tensor) gives the EMA
      the freshly updated master, read once from memory; any other source is
      read as it is. ``stochastic``/``seed``/``generator``: as
      :func:`opensora_fast.ops.ema_update_` (element indices run over the EMA
      pairs laid end to end, so the result equals ``ema_update_(ema, ema_src, ...)``
      run after the AdamW step, bit for bit).

    Bad input (types, lengths, dtypes other than fp32 masters, shapes,
    devices, contiguity, non-finite or out-of-range hyper-parameters,
    overlapping written tensors) raises TypeError/ValueError naming the
    argument and index before anything is written; the native kernels and the
    PyTorch reference raise the same. The op is not differentiable and is
    refused inside CUDA graph capture (its steps are host values).
    """
    lists = dict(
        params=list(params),
        grads=list(grads),
        exp_avgs=list(exp_avgs),
        exp_avg_sqs=list(exp_avg_sqs),
        max_exp_avg_sqs=list(max_exp_avg_sqs),
        steps=list(steps),
        ema=list(ema),
        ema_src=list(ema_src),
    )
    _ref.check_tensor_lists(**lists)
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"adamw_ema_: decay must be a real number, got {type(decay).__name__}")
    if not isinstance(stochastic, bool):
        raise TypeError(f"adamw_ema_: stochastic must be a bool, got {type(stochastic).__name__}")
    sizes = []
    for g, s in enumerate(group_sizes):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"adamw_ema_: group_sizes[{g}] must be an int, got {type(s).__name__}")
        sizes.append(int(s))
    hyper = [
        _floats(n, v)
        for n, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay))
    ]
    flags = [_flags("amsgrad", amsgrad), _flags("maximize", maximize)]
    if seed is not None:
        seed = _as_int64(seed)
    elif stochastic and lists["ema"]:
        seed = draw_seed(generator)
    seed = seed if stochastic and seed is not None else 0
    args = (
        lists["params"],
        lists["grads"],
        lists["exp_avgs"],
        lists["exp_avg_sqs"],
        lists["max_exp_avg_sqs"],
        lists["steps"],
        sizes,
        *hyper,
        *flags,
        lists["ema"],
        lists["ema_src"],
        float(decay),
        stochastic,
        seed,
    )
    first = next((t for t in (lists["params"] + lists["ema"]) if t is not None), None)
    if first is None:  # nothing to update, but the call is still validated
        return _ref.adamw_ema_(*args)
    impl = pick("adamw_ema_", first.device, _ref.adamw_ema_) if _NATIVE else _ref.adamw_ema_
    explain_dispatch_refusal(impl, args, lambda: _ref.check_inputs(*args[:-2]))


_NATIVE = has_op("adamw_ema_")  # an extension built before this op: the reference, silently


@register_fake("adamw_ema_")
def _adamw_ema_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    group_sizes,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    maximize,
    ema,
    ema_src,
    decay,
    stochastic=False,
    seed=0,
):
    # The kernels' checks, so tracing and meta tensors fail alike.
    _ref.check_inputs(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        group_sizes,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        amsgrad,
        maximize,
        ema,
        ema_src,
        decay,
    )
    return None
