"""The Engram block: context-gated memory plus a short causal conv (DESIGN.md section 3, steps 5-6).

Tensors are Megatron's ``[seq, batch, hidden]``. The block only computes the update ``y``; the
caller adds it to the residual stream (step 7) and owns the table lookup that produced ``e``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise conv over the sequence in which position t sees only t, t-d, ..., t-(k-1)d.

    Kept as its own module because it is the one place in the block that mixes positions: under
    sequence parallelism each rank must prepend the last ``halo_size`` positions of the previous
    rank's chunk, which ``forward(x, halo=...)`` accepts in place of the zero padding.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.halo_size = (kernel_size - 1) * dilation
        # Zero init makes a fresh block's conv branch vanish, so training starts from the gated memory alone.
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))

    def forward(self, x: torch.Tensor, halo: torch.Tensor | None = None) -> torch.Tensor:
        """x: [S, B, C]; halo: [halo_size, B, C] positions preceding x (zeros when None).

        Written as a sum of ``kernel_size`` shifted, channel-scaled copies of x rather than
        ``F.conv1d(groups=C)``: with a kernel this short the shifted sum stays in the [S, B, C]
        layout (no permutes), and on CPU its backward is ~4x faster than the depthwise conv's.
        """
        if halo is None:
            padded = F.pad(x, (0, 0, 0, 0, self.halo_size, 0))
        else:
            if halo.shape[0] != self.halo_size:
                raise ValueError(f"halo has {halo.shape[0]} positions, the conv needs {self.halo_size}")
            padded = torch.cat([halo, x], dim=0)
        length, taps = x.shape[0], self.weight[:, 0]
        y = padded[:length] * taps[:, 0]
        for tap in range(1, self.kernel_size):
            start = tap * self.dilation
            y = y + padded[start : start + length] * taps[:, tap]
        return y


class EngramBlock(nn.Module):
    """y = v~ + SiLU(conv(RMSNorm(v~))), v~ = alpha * W_V e, alpha = sigmoid(<RMSNorm(h), RMSNorm(W_K e)> / sqrt(H)).

    The gate lets the hidden state veto memory rows that hash collisions or an unhelpful n-gram
    brought in; the conv (dilation = largest n-gram order) lets neighbouring n-gram memories mix.
    ``gate_signed_sqrt`` applies sign(x) * sqrt(|x|) to the gate logit, as the released demo does,
    which keeps the sigmoid out of saturation when the dot product grows. ``projection_bias`` puts a
    bias on W_K and W_V, as the demo's ``nn.Linear`` layers have.
    """

    def __init__(
        self,
        hidden_size: int,
        memory_dim: int,
        max_order: int,
        kernel_size: int = 4,
        gate_signed_sqrt: bool = True,
        projection_bias: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.memory_dim = memory_dim
        self.gate_signed_sqrt = gate_signed_sqrt
        self.key_proj = nn.Linear(memory_dim, hidden_size, bias=projection_bias)
        self.value_proj = nn.Linear(memory_dim, hidden_size, bias=projection_bias)
        self.query_norm = nn.RMSNorm(hidden_size)
        self.key_norm = nn.RMSNorm(hidden_size)
        self.conv_norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.conv = CausalDepthwiseConv1d(hidden_size, kernel_size, dilation=max_order)
        self._last_gate_mean: torch.Tensor | None = None

    @property
    def last_gate_mean(self) -> float | None:
        """Mean gate of the last forward; read lazily so monitoring adds no device sync per step."""
        return None if self._last_gate_mean is None else float(self._last_gate_mean)

    def gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """alpha in (0, 1), shape [S, B, 1]."""
        key = self.key_norm(self.key_proj(e))
        logit = (self.query_norm(h) * key).sum(dim=-1, keepdim=True) / math.sqrt(self.hidden_size)
        if self.gate_signed_sqrt:
            logit = logit.sign() * logit.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(logit)

    def forward(self, h: torch.Tensor, e: torch.Tensor, conv_halo: torch.Tensor | None = None) -> torch.Tensor:
        """h: [S, B, hidden_size], e: [S, B, memory_dim] -> y: [S, B, hidden_size].

        ``conv_halo`` is the sequence-parallel hook of ``CausalDepthwiseConv1d.forward``: the
        normalised gated values of the positions just before this chunk.
        """
        if h.shape[:-1] != e.shape[:-1] or h.shape[-1] != self.hidden_size or e.shape[-1] != self.memory_dim:
            raise ValueError(
                f"expected h [S, B, {self.hidden_size}] and e [S, B, {self.memory_dim}], "
                f"got {tuple(h.shape)} and {tuple(e.shape)}"
            )
        alpha = self.gate(h, e)
        self._last_gate_mean = alpha.detach().mean()
        gated = alpha * self.value_proj(e)
        return gated + F.silu(self.conv(self.conv_norm(gated), halo=conv_halo))
