"""A small MMDiT-like transformer over packed latents, with the parameter naming
of Open-Sora's 11B model (``img_in``, ``time_in.in_layer``, ``double_blocks.N.img_attn.q_proj``,
``single_blocks.N.v_mlp``, ``final_layer.adaLN_modulation.1`` ...) at small sizes,
written for the demo (not upstream's code).

Two details make the upstream rules bite: a top-level ``pos_embed`` parameter
(``update_ema`` skips it) and a frozen ``txt_in`` (no ``requires_grad``: skipped by
the EMA, never stepped). The whole model is cast to bf16, as ColossalAI's booster
does, so every EMA source is an fp32 master shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MMDiTConfig:
    """Sizes of the transformer (``in_channels`` is the packed latent width C * 4)."""

    in_channels: int
    hidden_size: int
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    context_in_dim: int
    vec_in_dim: int
    img_tokens: int  # length of pos_embed
    mlp_ratio: float = 4.0
    theta: int = 10_000
    patch_size: int = 2

    @property
    def axes_dim(self) -> Tuple[int, int, int]:
        head = self.hidden_size // self.num_heads
        # (t, h, w) rotary dims, each even, summing to the head dim
        a = (head // 4) // 2 * 2
        return (head - 2 * a, a, a)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps ``t`` [B] -> [B, dim] in t's dtype."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope(ids: Tensor, axes_dim: Tuple[int, ...], theta: int) -> Tensor:
    """Rotary angles for token positions ``ids`` [B, L, 3] -> (cos, sin) stacked [2, B, 1, L, head/2]."""
    parts = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=ids.device) / d)
        parts.append(ids[..., i].float()[..., None] * omega)
    ang = torch.cat(parts, dim=-1)[:, None]
    return torch.stack([ang.cos(), ang.sin()])


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotates pairs of the last dim of ``x`` [B, H, L, D] by ``pe`` (see :func:`rope`)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = pe[0], pe[1]
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.reshape(x.shape).to(x.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm computed in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (y * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Unfused q/k/v projections (the 11B model's ``fused_qkv=False`` naming)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> Tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(dim, num_heads))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", _mlp(dim, hidden))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> Tuple[Tensor, Tensor]:
        im = self.img_mod(vec)
        tm = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv((1 + im[1]) * self.img_norm1(img) + im[0])
        tq, tk, tv = self.txt_attn.qkv((1 + tm[1]) * self.txt_norm1(txt) + tm[0])
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        t_out, i_out = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + im[2] * self.img_attn.proj(i_out)
        img = img + im[5] * self.img_mlp((1 + im[4]) * self.img_norm2(img) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(t_out)
        txt = txt + tm[5] * self.txt_mlp((1 + tm[4]) * self.txt_norm2(txt) + tm[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over cat(txt, img): q, k, and v fused with the MLP's input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_mlp = nn.Linear(dim, dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        h = (1 + scale) * self.pre_norm(x) + shift
        B, L, D = h.shape
        split = lambda t: t.view(B, L, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q = self.norm.query_norm(split(self.q_proj(h)))
        k = self.norm.key_norm(split(self.k_proj(h)))
        v, mlp = torch.split(self.v_mlp(h), [D, self.mlp_hidden_dim], dim=-1)
        attn = attention(q, k, split(v.contiguous()), pe)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class MMDiT(nn.Module):
    """``forward(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)`` as
    upstream's MMDiTModel: packed image tokens [B, L, C*4] in, velocity out."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        if d % c.num_heads:
            raise ValueError(f"hidden_size {d} must be divisible by num_heads {c.num_heads}")
        self.pos_embed = nn.Parameter(torch.randn(1, c.img_tokens, d) * 0.02)
        self.img_in = nn.Linear(c.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(c.vec_in_dim, d)
        self.cond_in = nn.Linear(c.in_channels + c.patch_size**2, d)
        self.txt_in = nn.Linear(c.context_in_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, c.in_channels)
        nn.init.zeros_(self.cond_in.weight)  # as upstream: the condition starts switched off
        nn.init.zeros_(self.cond_in.bias)
        self.txt_in.requires_grad_(False)  # a frozen part: the EMA and optimizer skip it

    def to_training_dtype(self, dtype: torch.dtype) -> "MMDiT":
        """Casts every parameter to ``dtype`` (the fp32 masters keep the precision)."""
        return self.to(dtype)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y_vec: Tensor,
        cond: Tensor,
        guidance: Tensor = None,
        **kwargs,
    ) -> Tensor:
        dt = self.img_in.weight.dtype
        x = self.img_in(img) + self.cond_in(cond) + self.pos_embed[:, : img.shape[1]]
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dt)) + self.vector_in(y_vec)
        t = self.txt_in(txt)
        pe = rope(torch.cat((txt_ids, img_ids), 1), self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            x, t = block(x, t, vec, pe)
        x = torch.cat((t, x), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, t.shape[1] :], vec)
