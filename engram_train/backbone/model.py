"""Megatron-core GPTModel with MoE layers, and Engram blocks inserted before chosen layers.

The Engram block at layer l adds ``y = EngramBlock(h, e_l)`` to the residual stream right before
layer l's attention. It is inserted with a forward pre-hook on Megatron's TransformerLayer rather
than by wrapping or re-specifying the layer, so Megatron's own modules, parameter names and
parallel layouts stay exactly as in the MoE baseline: Engram off is the same model minus the hooks.
The table rows ``e`` are looked up outside the model (host-RAM table, engram_train/memory) and
handed to ``forward``; the model never owns the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from torch import nn

from engram_train.config import EngramConfig, ModelConfig
from engram_train.backbone.init import canonical_init_
from engram_train.backbone.kernels import Kernels, fused_softmax_available
from engram_train.backbone.moe_stats import MoELoadTracker
from engram_train.engram.module import EngramBlock


@dataclass(frozen=True)
class EngramLayout:
    """How the looked-up rows map onto the backbone: which layers, and the width of one layer's memory."""

    layers: tuple[int, ...]
    heads_total: int
    head_dim: int
    max_order: int

    @property
    def memory_dim(self) -> int:
        return self.heads_total * self.head_dim

    @classmethod
    def from_config(cls, engram: EngramConfig) -> "EngramLayout | None":
        if not engram.enabled:
            return None
        return cls(
            layers=tuple(engram.layers),
            heads_total=len(engram.ngram_orders) * engram.heads_per_order,
            head_dim=engram.head_dim,
            max_order=max(engram.ngram_orders),
        )


def transformer_config(model: ModelConfig, kernels: Kernels, *, tp: int, ep: int, on_cpu: bool) -> TransformerConfig:
    """Megatron TransformerConfig from our schema; dropout off so runs are bit-reproducible."""
    moe = model.num_experts > 0
    extra = {}
    if moe:
        extra = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_token_dispatcher_type=model.moe_token_dispatcher,
            moe_router_load_balancing_type="aux_loss",
            moe_grouped_gemm=kernels.grouped_gemm,
            moe_layer_freq=model.moe_layer_freq,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size or None,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        init_method_std=model.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1 and moe,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=not on_cpu and fused_softmax_available(),
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **kernels.transformer_config_kwargs(),
        **extra,
    )


class ForwardRows:
    """The table rows of one forward, [batch, seq, Engram layers, heads, dim], handed out per Engram layer.

    ``source`` is the rows or a callable producing them (a prefetch still in flight, awaited only when the first
    Engram layer asks). The rows are split once with ``unbind``: its backward stacks the layers' gradients, where
    indexing per layer would zero-fill a rows-sized gradient for every layer. With ``per_call_views`` (full
    recompute) every call cuts a fresh view instead: the layer runs again in the backward with grad enabled, and
    must not reuse a view cut in the forward, which ran without grad.
    """

    def __init__(self, source: torch.Tensor | Callable[[], torch.Tensor], *, per_call_views: bool):
        self.source, self.per_call_views = source, per_call_views
        self.rows: torch.Tensor | None = None
        self.split: tuple[torch.Tensor, ...] | None = None

    def layer(self, index: int) -> torch.Tensor:
        """Rows of the ``index``-th Engram layer, [batch, seq, heads, dim]."""
        if self.rows is None:
            self.rows = self.source() if callable(self.source) else self.source
        if self.per_call_views:
            return self.rows.select(2, index)
        if self.split is None:
            self.split = self.rows.unbind(dim=2)
        return self.split[index]


class EngramMoEModel(nn.Module):
    """GPTModel (MoE) plus Engram blocks; returns per-token loss [batch, seq] like GPTModel."""

    def __init__(
        self,
        model: ModelConfig,
        layout: EngramLayout | None,
        *,
        vocab_size: int,
        seq_len: int,
        gate_signed_sqrt: bool = True,
        projection_bias: bool = True,
        conv_kernel_size: int = 4,
        tp: int = 1,
        ep: int = 1,
        on_cpu: bool = True,
        init_seed: int = 0,
    ):
        super().__init__()
        # Megatron's bf16 path builds every weight in bf16 (params_dtype) and computes the loss in fp32. Its
        # Float16Module wrapper is not used: it would only cast float inputs (ours are token ids; Engram rows
        # are cast by the blocks) and outputs (the per-token loss is already fp32), and it would rename every
        # parameter under ``module.``, which keys the canonical init and the checkpoints.
        self.kernels = Kernels.resolve(model, on_gpu=not on_cpu, expert_tp=tp)
        self.config = transformer_config(model, self.kernels, tp=tp, ep=ep, on_cpu=on_cpu)
        self.gpt = GPTModel(
            config=self.config,
            transformer_layer_spec=self.kernels.layer_spec(self.config),
            vocab_size=vocab_size,
            max_sequence_length=seq_len,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            share_embeddings_and_output_weights=False,
        )
        self.moe_load = MoELoadTracker(self.gpt)
        self.layout = layout
        self.engram_blocks = nn.ModuleDict()
        self._rows: ForwardRows | None = None  # this forward's rows, set by forward()
        canonical_init_(
            self.gpt, seed=init_seed, std=model.init_std, num_layers=model.num_layers,
            gated_linear_unit=self.config.gated_linear_unit,
        )
        if layout is None:
            return
        # Engram blocks are replicated on every rank: draw them from one fixed stream, whatever the layout.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed + 1)
            for layer in layout.layers:
                self.engram_blocks[str(layer)] = EngramBlock(
                    hidden_size=model.hidden_size,
                    memory_dim=layout.memory_dim,
                    max_order=layout.max_order,
                    kernel_size=conv_kernel_size,
                    gate_signed_sqrt=gate_signed_sqrt,
                    projection_bias=projection_bias,
                ).to(self.kernels.dtype)
        for param in self.engram_blocks.parameters():
            # Under SP each TP rank applies the block to its slice of the sequence: grads are partial.
            param.sequence_parallel = self.config.sequence_parallel
        for index, layer in enumerate(layout.layers):
            self.gpt.decoder.layers[layer].register_forward_pre_hook(
                self._make_engram_hook(layer, index), with_kwargs=True
            )

    def _make_engram_hook(self, layer: int, index: int):
        block = self.engram_blocks[str(layer)]

        def add_engram(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            # [seq, batch, heads*dim], contiguous so the projections run as plain GEMMs.
            if self._rows is None:
                raise RuntimeError(f"Engram layer {layer}: forward() was called without engram_rows")
            memory = self._rows.layer(index).flatten(-2).transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                # This rank holds a slice of the sequence, but the short conv looks back
                # (kernel-1) x dilation positions: run the block on the gathered sequence and keep
                # our slice (the gather's backward reduce-scatters the gradient to its owners).
                full = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
                update = block(full, memory).chunk(self.config.tensor_model_parallel_size, dim=0)
                hidden = hidden + update[parallel_state.get_tensor_model_parallel_rank()]
            else:
                hidden = hidden + block(hidden, memory)
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = hidden
                return args, kwargs
            return (hidden, *args[1:]), kwargs

        return add_engram

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        engram_rows: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-token cross-entropy [batch, seq].

        ``engram_rows`` [batch, seq, engram layers, heads, head_dim]: the table rows of this batch's hash
        ids, or a callable producing them (a prefetch still in flight, awaited at the first Engram layer).
        """
        if self.layout is not None and engram_rows is None:
            raise ValueError("this model has Engram layers: pass engram_rows (table.lookup(hash_ids))")
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        self._rows = None if engram_rows is None else ForwardRows(
            engram_rows, per_call_views=self.config.recompute_granularity == "full")
        try:
            return self.gpt(input_ids=input_ids, position_ids=position_ids, attention_mask=None, labels=labels)
        finally:
            if self.config.recompute_granularity != "full":  # else the backward's recompute still reads them
                self._rows = None

    def gate_means(self) -> dict[int, float]:
        """Mean Engram gate per layer from the last forward (a health signal: ~0 means memory unused)."""
        return {int(layer): block.last_gate_mean for layer, block in self.engram_blocks.items()}

    def take_eval_gate_histograms(self) -> dict[int, list[int]]:
        """Per Engram layer, the gate histogram of the evaluation forwards since the last call (this rank's tokens)."""
        counts = {int(layer): block.take_eval_gate_counts() for layer, block in self.engram_blocks.items()}
        return {layer: c for layer, c in counts.items() if c is not None}

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total backbone, Engram blocks (projections/norms/conv; the table is separate)."""
        engram = sum(p.numel() for p in self.engram_blocks.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"backbone": total - engram, "engram_blocks": engram}
