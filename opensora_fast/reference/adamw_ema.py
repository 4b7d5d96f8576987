"""Reference of ``opensora_fast::adamw_ema_``.

The AdamW part is torch's own foreach AdamW, op for op (``torch.optim.adam``'s
``_multi_tensor_adam`` with decoupled weight decay), per parameter group, with
one change: the square root is correctly rounded. torch's CUDA sqrt is; its
CPU one (MKL's vector sqrt) is not (about 15% of results 1 ulp off), and the
kernels round it correctly on both devices so that CPU and GPU agree bit for
bit. The EMA part is the EMA op's reference, run afterwards on the updated
masters. The native kernels reproduce both bit for bit.
"""

from __future__ import annotations

import math
from itertools import repeat
from typing import Sequence

import torch

from . import ema as _ema
from ._checks import find_overlap, shape_str, tensor_span

_EMA_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "ema", "ema_src")
_WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "ema")


def check_tensor_lists(**lists: Sequence) -> None:
    """Every item of every list is a tensor: TypeError naming the first that is not."""
    for name in _LISTS:
        items = lists[name]
        if not all(map(isinstance, items, repeat(torch.Tensor))):  # C-level: no Python call per item
            i, bad = next((i, x) for i, x in enumerate(items) if not isinstance(x, torch.Tensor))
            raise TypeError(f"adamw_ema_: {name}[{i}] must be a tensor, got {type(bad).__name__}")


def _check_tensor(name, i, t, is_ema, written, like, like_name, like_i, first, first_name) -> None:
    if t.layout != torch.strided or t.is_nested:
        raise ValueError(f"adamw_ema_: {name}[{i}] must be a dense (strided) tensor")
    if is_ema:
        if t.dtype not in _EMA_FLOATS:
            raise TypeError(f"adamw_ema_: {name}[{i}] has dtype {t.dtype}; expected float32, bfloat16 or float16")
    elif t.dtype != torch.float32:
        raise TypeError(f"adamw_ema_: {name}[{i}] has dtype {t.dtype}; expected torch.float32 (fp32 masters)")
    if t.is_neg():
        raise ValueError(
            f"adamw_ema_: {name}[{i}] is a negated view (neg bit set); pass a tensor without it "
            "(.resolve_neg() makes a copy)"
        )
    if t is not like and t.shape != like.shape:
        raise ValueError(
            f"adamw_ema_: {name}[{i}] has shape {shape_str(t.shape)} but {like_name}[{like_i}] has shape "
            f"{shape_str(like.shape)}"
        )
    if t.device != first.device:
        raise ValueError(
            f"adamw_ema_: all tensors but steps must be on one device; {first_name}[0] is on {first.device} "
            f"but {name}[{i}] is on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"adamw_ema_: {name}[{i}] is not contiguous")
    if written and t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"adamw_ema_: {name}[{i}] is an inference tensor; it can only be updated in place inside "
            "torch.inference_mode()"
        )


def _check_hyper(name: str, g: int, x: float, below_one: bool) -> None:
    x = float(x)
    if below_one:
        if not 0.0 <= x < 1.0:
            raise ValueError(f"adamw_ema_: {name}[{g}] must be in [0, 1), got {x!r}")
    elif not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"adamw_ema_: {name}[{g}] must be finite and >= 0, got {x!r}")


def _fused_sources(params, ema_src, spans_of) -> list[int]:
    """For each EMA pair, the param its source is (same memory, same size), or -1."""
    by_start = {}
    for i, p in enumerate(params):
        if p.numel() > 0:
            by_start.setdefault(spans_of(p).start, i)
    out = []
    for s in ema_src:
        k = by_start.get(spans_of(s).start, -1) if s.numel() > 0 else -1
        out.append(k if k >= 0 and params[k].numel() == s.numel() else -1)
    return out


def check_inputs(
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
) -> None:
    """The native op's checks, in its order and with its messages
    (csrc/adamw_ema/adamw_ema.cpp): first the autograd rule, then the list
    lengths, the hyper-parameters, every tensor, and aliasing. Nothing is
    written by a call that fails any of them."""
    lists = dict(
        params=params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        steps=steps,
        ema=ema,
        ema_src=ema_src,
    )
    check_tensor_lists(**lists)
    if torch.is_grad_enabled():
        for name in _WRITTEN:
            for i, t in enumerate(lists[name]):
                if t.requires_grad:
                    raise RuntimeError(
                        f"adamw_ema_: {name}[{i}] requires grad and grad mode is on; adamw_ema_ is not "
                        "differentiable: call it under torch.no_grad()"
                    )
    n = len(params)
    if not (len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(steps) == n):
        raise ValueError(
            "adamw_ema_: grads, exp_avgs, exp_avg_sqs and steps must have one tensor per param, got "
            f"len(params)={n}, len(grads)={len(grads)}, len(exp_avgs)={len(exp_avgs)}, "
            f"len(exp_avg_sqs)={len(exp_avg_sqs)}, len(steps)={len(steps)}"
        )
    ng = len(group_sizes)
    per_group = (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    if not all(len(x) == ng for x in per_group):
        raise ValueError(
            "adamw_ema_: lr, beta1, beta2, eps, weight_decay, amsgrad and maximize must have one value per "
            f"group, got len(group_sizes)={ng}, len(lr)={len(lr)}, len(beta1)={len(beta1)}, "
            f"len(beta2)={len(beta2)}, len(eps)={len(eps)}, len(weight_decay)={len(weight_decay)}, "
            f"len(amsgrad)={len(amsgrad)}, len(maximize)={len(maximize)}"
        )
    if any(int(s) < 0 for s in group_sizes) or sum(int(s) for s in group_sizes) != n:
        raise ValueError(
            f"adamw_ema_: group_sizes must be >= 0 and sum to len(params)={n}, got {shape_str(group_sizes)}"
        )
    n_ams = 0
    for g in range(ng):
        if int(amsgrad[g]) not in (0, 1):
            raise ValueError(f"adamw_ema_: amsgrad[{g}] must be 0 or 1, got {int(amsgrad[g])}")
        if int(maximize[g]) not in (0, 1):
            raise ValueError(f"adamw_ema_: maximize[{g}] must be 0 or 1, got {int(maximize[g])}")
        if int(amsgrad[g]):
            n_ams += int(group_sizes[g])
    if len(max_exp_avg_sqs) != n_ams:
        raise ValueError(
            f"adamw_ema_: max_exp_avg_sqs must have one tensor per param of the amsgrad groups ({n_ams}), "
            f"got len(max_exp_avg_sqs)={len(max_exp_avg_sqs)}"
        )
    if len(ema) != len(ema_src):
        raise ValueError(
            f"adamw_ema_: ema and ema_src must have the same length, got len(ema)={len(ema)} and "
            f"len(ema_src)={len(ema_src)}"
        )
    for g in range(ng):
        _check_hyper("lr", g, lr[g], False)
        _check_hyper("beta1", g, beta1[g], True)
        _check_hyper("beta2", g, beta2[g], True)
        _check_hyper("eps", g, eps[g], False)
        _check_hyper("weight_decay", g, weight_decay[g], False)
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"adamw_ema_: decay must be in [0, 1], got {float(decay)!r}")
    if n == 0 and not ema:
        return
    first, first_name = (params[0], "params") if n else (ema[0], "ema")
    i = k = 0
    for g in range(ng):
        for _ in range(int(group_sizes[g])):
            p = params[i]
            _check_tensor("params", i, p, False, True, p, "params", i, first, first_name)
            _check_tensor("grads", i, grads[i], False, False, p, "params", i, first, first_name)
            _check_tensor("exp_avgs", i, exp_avgs[i], False, True, p, "params", i, first, first_name)
            _check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], False, True, p, "params", i, first, first_name)
            if int(amsgrad[g]):
                _check_tensor("max_exp_avg_sqs", k, max_exp_avg_sqs[k], False, True, p, "params", i, first, first_name)
                k += 1
            s = steps[i]
            if not (
                s.layout == torch.strided
                and not s.is_nested
                and s.dtype == torch.float32
                and s.numel() == 1
                and s.device.type == "cpu"
                and not s.is_neg()
            ):
                raise ValueError(
                    f"adamw_ema_: steps[{i}] must be a float32 tensor of one element on the CPU "
                    "(torch AdamW's state['step'])"
                )
            if s.is_inference() and not torch.is_inference_mode_enabled():
                raise RuntimeError(
                    f"adamw_ema_: steps[{i}] is an inference tensor; it can only be updated in place inside "
                    "torch.inference_mode()"
                )
            i += 1
    for j, (e, s) in enumerate(zip(ema, ema_src)):
        _check_tensor("ema_src", j, s, False, False, s, "ema_src", j, first, first_name)
        _check_tensor("ema", j, e, True, True, s, "ema_src", j, first, first_name)
    if first.device.type == "meta":
        return
    storages: dict = {}
    span_cache: dict = {}

    def span(t, written, arg, idx):
        return tensor_span(t, written, arg, idx, storages)

    def start_of(t):
        key = id(t)
        if key not in span_cache:
            span_cache[key] = span(t, False, "", 0)
        return span_cache[key]

    fused = _fused_sources(params, ema_src, start_of)
    twin = [-1] * n
    for j, k in enumerate(fused):
        if k < 0:
            continue
        if twin[k] >= 0:
            raise ValueError(
                f"adamw_ema_: ema_src[{twin[k]}] and ema_src[{j}] are both params[{k}]; a param has at most one "
                "EMA twin"
            )
        twin[k] = j
    spans = []
    for q in range(n):
        spans.append(span(params[q], True, "params", q))
        spans.append(span(grads[q], False, "grads", q))
        spans.append(span(exp_avgs[q], True, "exp_avgs", q))
        spans.append(span(exp_avg_sqs[q], True, "exp_avg_sqs", q))
    spans += [span(t, True, "max_exp_avg_sqs", q) for q, t in enumerate(max_exp_avg_sqs)]
    spans += [span(t, True, "steps", q) for q, t in enumerate(steps)]
    for j, (e, s) in enumerate(zip(ema, ema_src)):
        spans.append(span(e, True, "ema", j))
        if fused[j] < 0:
            spans.append(span(s, False, "ema_src", j))
    hit = find_overlap(spans)
    if hit is not None:
        a, b = hit
        raise ValueError(
            f"adamw_ema_: {a.arg}[{a.index}] and {b.arg}[{b.index}] overlap in memory; a written tensor must "
            "share no memory with any other tensor of the call (an ema_src may be one of the params)"
        )


def adamw_ema_(
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
    stochastic: bool = False,
    seed: int = 0,
) -> None:
    check_inputs(
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
    with torch.no_grad():
        lo = k = 0
        for g, size in enumerate(group_sizes):
            size = int(size)
            hi = lo + size
            vmax = list(max_exp_avg_sqs[k : k + size]) if int(amsgrad[g]) else []
            k += len(vmax)
            _torch_adamw(
                list(params[lo:hi]),
                list(grads[lo:hi]),
                list(exp_avgs[lo:hi]),
                list(exp_avg_sqs[lo:hi]),
                vmax,
                list(steps[lo:hi]),
                float(lr[g]),
                float(beta1[g]),
                float(beta2[g]),
                float(eps[g]),
                float(weight_decay[g]),
                bool(int(amsgrad[g])),
                bool(int(maximize[g])),
            )
            lo = hi
        if ema:
            _ema.ema_update_(list(ema), list(ema_src), float(decay), stochastic, seed)


def _torch_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize
) -> None:
    """torch's foreach AdamW (decoupled weight decay, not capturable), op for op."""
    if not params:
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    for s in steps:
        s.add_(1.0)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    values = [float(s) for s in steps]
    step_size = [(lr / (1 - beta1**t)) * -1 for t in values]
    bc2_sqrt = [(1 - beta2**t) ** 0.5 for t in values]
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    # fp32 sqrt correctly rounded: via float64 (53 >= 2*24 + 2 bits, so the double rounding is exact)
    denom = [t.double().sqrt_().float() for t in (max_exp_avg_sqs if amsgrad else exp_avg_sqs)]
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
