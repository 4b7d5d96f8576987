"""A toy causal video VAE with the interface upstream's conditioning helpers use:
``encode``, ``decode``, ``get_latent_size``, ``time_compression_ratio`` and
``cfg.latent_channels`` (Hunyuan-VAE-like: 4x in time, first frame alone, 8x in space).

Causal: latent frame 0 sees only pixel frame 0, latent frame k the frames
``4k-3 .. 4k``, so encoding the first frame alone gives latent frame 0 of the
whole video. Each latent position is computed from its own patch only (a patch
embedding and a per-position MLP), so encodes do not depend on the batch they
run in.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ToyCausalVAE(nn.Module):
    def __init__(self, latent_channels: int = 16, hidden: int = 64, tcr: int = 4, scr: int = 8, in_ch: int = 3):
        super().__init__()
        self.cfg = SimpleNamespace(latent_channels=latent_channels)
        self.time_compression_ratio = tcr
        self.spatial_compression_ratio = scr
        patch = in_ch * tcr * scr * scr
        self.in_ch = in_ch
        self.enc_in = nn.Linear(patch, hidden)
        self.enc_out = nn.Linear(hidden, latent_channels)
        self.dec_in = nn.Linear(latent_channels, hidden)
        self.dec_out = nn.Linear(hidden, patch)
        self._encode_s = 0.0
        self._events: list = []

    def pop_encode_time(self) -> float:
        """Seconds spent in :meth:`encode` since the last call (on a GPU from CUDA
        events, so timing adds no host sync; read after the caller synchronised)."""
        total, self._encode_s = self._encode_s, 0.0
        for start, end in self._events:
            total += start.elapsed_time(end) / 1e3
        self._events = []
        return total

    def get_latent_size(self, input_size) -> Tuple[int, int, int]:
        """(frames, height, width) of the video -> the latent's (T, H, W)."""
        t, h, w = (int(s) for s in input_size)
        tcr, scr = self.time_compression_ratio, self.spatial_compression_ratio
        return (t - 1) // tcr + 1 if t > 0 else 0, h // scr, w // scr

    def encode(self, x: Tensor) -> Tensor:
        """[B, 3, F, H, W] -> [B, C, (F-1)//4+1, H/8, W/8] in the weights' dtype."""
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            z = self._encode(x)
            end.record()
            self._events.append((start, end))
            return z
        t0 = time.perf_counter()
        z = self._encode(x)
        self._encode_s += time.perf_counter() - t0
        return z

    def _encode(self, x: Tensor) -> Tensor:
        B, c, f, h, w = x.shape
        tcr, s = self.time_compression_ratio, self.spatial_compression_ratio
        T = (f - 1) // tcr + 1
        # the first frame is repeated tcr-1 times in front: latent frame 0 sees only it
        x = torch.cat([x[:, :, :1].expand(B, c, tcr - 1, h, w), x[:, :, : 1 + (T - 1) * tcr]], dim=2)
        x = x.to(self.enc_in.weight.dtype)
        p = x.reshape(B, c, T, tcr, h // s, s, w // s, s).permute(0, 2, 4, 6, 1, 3, 5, 7)
        p = p.reshape(B, T, h // s, w // s, -1)
        z = self.enc_out(F.silu(self.enc_in(p)))
        return z.permute(0, 4, 1, 2, 3).contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """[B, C, T, h, w] -> [B, 3, 1 + (T-1)*4, 8h, 8w] in [-1, 1]."""
        B, C, T, h, w = z.shape
        tcr, s = self.time_compression_ratio, self.spatial_compression_ratio
        p = self.dec_out(F.silu(self.dec_in(z.permute(0, 2, 3, 4, 1).to(self.dec_in.weight.dtype))))
        p = p.reshape(B, T, h, w, self.in_ch, tcr, s, s).permute(0, 4, 1, 5, 2, 6, 3, 7)
        video = p.reshape(B, self.in_ch, T * tcr, h * s, w * s)[:, :, tcr - 1 :]
        return video.float().tanh()
