"""EngramBlock: [S, B, H] in and out, gate in (0, 1), identity conv at init, strictly causal."""

from __future__ import annotations

import pytest
import torch

from engram_train.engram.module import CausalDepthwiseConv1d, EngramBlock

S, B, H, M, ORDER = 12, 2, 16, 24, 3


@pytest.fixture
def block():
    torch.manual_seed(0)
    return EngramBlock(hidden_size=H, memory_dim=M, max_order=ORDER, kernel_size=4)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, M, generator=g)


def test_output_has_hidden_shape_and_gate_lies_in_unit_interval(block):
    h, e = inputs()
    y = block(h, e)
    assert y.shape == (S, B, H)
    alpha = block.gate(h, e)
    assert alpha.shape == (S, B, 1)
    assert bool(((alpha > 0) & (alpha < 1)).all())
    assert 0 < block.last_gate_mean < 1
    assert block.last_gate_mean == pytest.approx(alpha.mean().item())


def test_fresh_block_is_the_gated_value_alone(block):
    h, e = inputs()
    y = block(h, e)
    assert torch.equal(y, block.gate(h, e) * block.value_proj(e))


def test_gate_without_signed_sqrt_is_plain_sigmoid(block):
    h, e = inputs()
    block.gate_signed_sqrt = False
    raw = (block.query_norm(h) * block.key_norm(block.key_proj(e))).sum(-1, keepdim=True) / H**0.5
    torch.testing.assert_close(block.gate(h, e), torch.sigmoid(raw))


@pytest.mark.parametrize("trained_conv", [False, True])
def test_output_at_t_ignores_every_later_position(block, trained_conv):
    if trained_conv:
        with torch.no_grad():
            block.conv.weight.normal_()
    h, e = inputs()
    h.requires_grad_(True)
    e.requires_grad_(True)
    y = block(h, e)
    for t in range(S):
        gh, ge = torch.autograd.grad(y[t].sum(), (h, e), retain_graph=True)
        assert torch.count_nonzero(gh[t + 1 :]) == 0
        assert torch.count_nonzero(ge[t + 1 :]) == 0
        assert torch.count_nonzero(ge[t]) > 0
    if trained_conv:
        # The conv reaches back exactly (kernel - 1) * dilation positions, on the dilation grid.
        ge = torch.autograd.grad(y[S - 1].sum(), e)[0]
        reached = [s for s in range(S) if torch.count_nonzero(ge[s]) > 0]
        assert reached == [S - 1 - ORDER * k for k in (3, 2, 1, 0)]


@pytest.mark.parametrize("kernel_size", [1, 4])
def test_conv_matches_torch_depthwise_conv1d_forward_and_backward(kernel_size):
    """The shifted-sum conv is the causal (left-padded) depthwise ``F.conv1d``, gradients included."""
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(H, kernel_size=kernel_size, dilation=ORDER)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(S, B, H, requires_grad=True)
    grad_out = torch.randn(S, B, H)
    y = conv(x)
    (grad_x, grad_w) = torch.autograd.grad(y, (x, conv.weight), grad_out)

    x_ref = x.detach().clone().requires_grad_()
    weight_ref = conv.weight.detach().clone().requires_grad_()
    padded = torch.nn.functional.pad(x_ref.permute(1, 2, 0), (conv.left_padding, 0))
    y_ref = torch.nn.functional.conv1d(padded, weight_ref, dilation=ORDER, groups=H).permute(2, 0, 1)
    (grad_x_ref, grad_w_ref) = torch.autograd.grad(y_ref, (x_ref, weight_ref), grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_w, grad_w_ref)


@pytest.mark.parametrize("bias", [True, False])
def test_projection_bias_is_a_setting(bias):
    block = EngramBlock(hidden_size=H, memory_dim=M, max_order=ORDER, projection_bias=bias)
    assert (block.key_proj.bias is not None) == bias and (block.value_proj.bias is not None) == bias
