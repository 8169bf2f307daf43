"""Torch's grouped matmul standing in for the grouped_gemm package under Megatron's GroupedMLP, and when the
backbone picks grouped experts."""

from __future__ import annotations

import pytest
import torch

from engram_train.backbone.grouped_gemm import gmm
from engram_train.backbone.kernels import Kernels
from engram_train.config import ConfigError, ModelConfig


@pytest.mark.parametrize("trans_b", [False, True])
def test_gmm_is_one_matmul_per_expert_forward_and_backward(trans_b):
    """The grouped_gemm package's contract (rows of expert e times its weight), an empty expert included."""
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 0, 9, 4])
    a = torch.randn(int(sizes.sum()), 16, generator=generator, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn(4, 16, 24, generator=generator).to(torch.bfloat16)
    if trans_b:
        b = b.transpose(1, 2).contiguous()
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = gmm(a1, b1, sizes, trans_b=trans_b)
    starts = [0, *torch.cumsum(sizes, 0).tolist()]
    ref = torch.cat([a2[s:e] @ (b2[k].t() if trans_b else b2[k]) for k, (s, e) in enumerate(zip(starts, starts[1:]))])
    grad = torch.randn(out.shape, generator=generator).to(torch.bfloat16)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-2, atol=1e-2)
    assert torch.count_nonzero(b1.grad[1]) == 0, "an expert without tokens gets a zero gradient"


def test_experts_are_grouped_where_asked_in_bf16_and_sequential_by_default_on_cpu():
    assert Kernels.resolve(ModelConfig(), on_gpu=False).experts == "sequential"
    grouped = Kernels.resolve(ModelConfig(precision="bf16", experts="grouped"), on_gpu=False)
    assert grouped.grouped_gemm and "torch._grouped_mm" in grouped.describe()
    with pytest.raises(ConfigError, match="model.experts=grouped .* bf16 only"):
        Kernels.resolve(ModelConfig(precision="fp32", experts="grouped"), on_gpu=False)
    narrow = ModelConfig(precision="bf16", experts="grouped", moe_ffn_hidden_size=24)
    assert Kernels.resolve(narrow, on_gpu=False).grouped_gemm
    with pytest.raises(ConfigError, match=r"parallel.tp = 12\) to be multiples of 8"):
        Kernels.resolve(narrow, on_gpu=False, expert_tp=2)
