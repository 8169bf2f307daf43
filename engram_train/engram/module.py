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

    Kept as its own module because it is the one place in the block that mixes positions (under sequence
    parallelism the block sees the whole sequence: the SP wrapper gathers it first).
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.left_padding = (kernel_size - 1) * dilation  # zeros before position 0
        # Zero init makes a fresh block's conv branch vanish, so training starts from the gated memory alone.
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, B, C] -> [S, B, C].

        Written as a sum of ``kernel_size`` shifted, channel-scaled copies of x rather than
        ``F.conv1d(groups=C)``: with a kernel this short the shifted sum stays in the [S, B, C]
        layout (no permutes), and on CPU its backward is ~4x faster than the depthwise conv's.
        """
        padded = F.pad(x, (0, 0, 0, 0, self.left_padding, 0))
        length, taps = x.shape[0], self.weight[:, 0]
        y = padded[:length] * taps[:, 0]
        for tap in range(1, self.kernel_size):
            start = tap * self.dilation
            y = y + padded[start : start + length] * taps[:, tap]
        return y


#: Bins of the gate histogram logged at evaluation points (W&B ``engram_gate_hist/layer_<l>``).
GATE_HISTOGRAM_BINS = 32

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
        # An explicit eps: nn.RMSNorm's default is the input dtype's machine epsilon, 0.0078 in bf16, which
        # would move bf16 keys of small norm away from their fp32 values.
        self.query_norm = nn.RMSNorm(hidden_size, eps=torch.finfo(torch.float32).eps)
        self.key_norm = nn.RMSNorm(hidden_size, eps=torch.finfo(torch.float32).eps)
        self.conv_norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.conv = CausalDepthwiseConv1d(hidden_size, kernel_size, dilation=max_order)
        self._last_gate_mean: torch.Tensor | None = None
        self._eval_gate_counts: torch.Tensor | None = None

    @property
    def last_gate_mean(self) -> float | None:
        """Mean gate of the last forward; read lazily so monitoring adds no device sync per step."""
        return None if self._last_gate_mean is None else float(self._last_gate_mean)

    def take_eval_gate_counts(self) -> list[int] | None:
        """Counts of the gate's values in ``GATE_HISTOGRAM_BINS`` equal bins over [0, 1], summed over every
        token of the evaluation forwards since the last call (None if there was none), then reset. The mean
        hides a gate that is open for some n-grams and shut for others; the histogram shows it."""
        counts, self._eval_gate_counts = self._eval_gate_counts, None
        return None if counts is None else [int(c) for c in counts.tolist()]

    def gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """alpha in (0, 1), shape [S, B, 1], always fp32.

        In a bf16 block the projections and norms run in bf16, but the dot product over the hidden size, the
        signed sqrt and the sigmoid run in fp32 (as Megatron keeps its router in fp32): a bf16 logit carries
        only 8 bits, and the gate scales every memory value.
        """
        key = self.key_norm(self.key_proj(e.to(self.key_proj.weight.dtype)))
        logit = (self.query_norm(h).float() * key.float()).sum(dim=-1, keepdim=True) / math.sqrt(self.hidden_size)
        if self.gate_signed_sqrt:
            logit = logit.sign() * logit.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(logit)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h: [S, B, hidden_size], e: [S, B, memory_dim] -> y: [S, B, hidden_size]."""
        if h.shape[:-1] != e.shape[:-1] or h.shape[-1] != self.hidden_size or e.shape[-1] != self.memory_dim:
            raise ValueError(
                f"expected h [S, B, {self.hidden_size}] and e [S, B, {self.memory_dim}], "
                f"got {tuple(h.shape)} and {tuple(e.shape)}"
            )
        e = e.to(self.value_proj.weight.dtype)  # rows arrive in the table's dtype
        alpha = self.gate(h, e)
        self._last_gate_mean = alpha.detach().mean()
        if not self.training:
            counts = torch.histc(alpha.detach(), bins=GATE_HISTOGRAM_BINS, min=0.0, max=1.0)
            self._eval_gate_counts = counts if self._eval_gate_counts is None else self._eval_gate_counts + counts
        value = self.value_proj(e)
        gated = alpha.to(value.dtype) * value
        return gated + F.silu(self.conv(self.conv_norm(gated)))
