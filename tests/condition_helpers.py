"""A tiny deterministic VAE-like encoder for the conditioning tests: only + and *
(exact IEEE ops, the same in torch's vector and scalar paths), so its output for
a sample does not depend on the batch it is encoded in, bit for bit."""

from types import SimpleNamespace

import torch
from torch import nn


class ToyVAE(nn.Module):
    """Pixels [B, 3, F, H, W] -> latents [B, C, T, H/s, W/s].

    causal: T = (F - 1) // tcr + 1 (frame 0 alone, then groups of tcr frames);
    uncausal: T = ceil(F / tcr) (groups of tcr, the last one may be short)."""

    def __init__(self, C=4, tcr=4, s=2, causal=True, dtype=torch.float32):
        super().__init__()
        self.cfg = SimpleNamespace(latent_channels=C)
        self.time_compression_ratio = tcr
        self.s, self.causal, self.C = s, causal, C
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter((torch.randn(C, 3, generator=g) * 0.5).to(dtype), requires_grad=False)
        self.calls = []

    def get_latent_size(self, size):
        F, H, W = size
        tcr = self.time_compression_ratio
        T = (F - 1) // tcr + 1 if self.causal else -(-F // tcr)
        return T, H // self.s, W // self.s

    def _frames(self, y, lo, hi):
        acc = y[:, :, lo]
        for k in range(lo + 1, hi):
            acc = acc + y[:, :, k]
        return acc * (1.0 / (hi - lo))

    @torch.no_grad()
    def encode(self, x):
        self.calls.append(tuple(x.shape))
        x = x.to(self.w.dtype)
        s = self.s
        B, _, F, H, W = x.shape
        # spatial pooling by explicit adds
        p = x[..., 0 : H - H % s : s, 0 : W - W % s : s]
        for i in range(s):
            for j in range(s):
                if i or j:
                    p = p + x[..., i : H - H % s : s, j : W - W % s : s]
        p = p * (1.0 / (s * s))
        # channel mixing + a polynomial nonlinearity, elementwise
        y = sum(self.w[:, k].view(1, -1, 1, 1, 1) * p[:, k : k + 1] for k in range(3))
        y = y + 0.1 * y * y
        tcr = self.time_compression_ratio
        T = self.get_latent_size((F, H, W))[0]
        frames = []
        for t in range(T):
            if self.causal:
                lo, hi = (0, 1) if t == 0 else (1 + (t - 1) * tcr, min(1 + t * tcr, F))
            else:
                lo, hi = t * tcr, min((t + 1) * tcr, F)
            frames.append(self._frames(y, lo, hi))
        return torch.stack(frames, dim=2)


def videos(B, F, H=8, W=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, F, H, W, generator=g).to(dtype)
