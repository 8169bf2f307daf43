"""Which precision, attention kernel and recompute the backbone runs with (``model.precision``,
``model.attention``, ``model.recompute``), resolved once against the machine and turned into Megatron's own
switches: ``TransformerConfig(bf16, params_dtype, recompute_*, moe_grouped_gemm)`` and the layer spec.

- bf16 is Megatron's bf16 path: the layers build their weights in bf16 (``params_dtype``), the optimizer steps
  fp32 main copies, gradients accumulate and are reduced in fp32 (``grad_reduce_in_fp32``), the router and the
  loss compute in fp32 (Megatron's ``moe_router_dtype`` and cross-entropy), the Engram gate in fp32.
- Attention: Transformer Engine layer specs where TE imports on a GPU (fused attention, grouped expert GEMMs),
  else ``SdpaAttention`` (torch's scaled_dot_product_attention), or Megatron's unfused ``DotProductAttention``.
- Experts: one grouped GEMM per MoE layer (``model.experts``): TE's ``TEGroupedMLP`` with TE specs, else
  Megatron's legacy ``GroupedMLP`` with torch's grouped matmul standing in for the CUDA-only ``grouped_gemm``
  package (``backbone/grouped_gemm.py``; Megatron runs it in bf16 only); or one expert after another
  (``SequentialMLP``). Both layouts start from the same weights (``backbone/init.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from engram_train.backbone.grouped_gemm import grouped_gemm_backend, install_torch_grouped_gemm, torch_grouped_mm_error
from engram_train.backbone.norm import SequenceParallelTorchNorm
from engram_train.config import ConfigError, ModelConfig


def te_import_error() -> str | None:
    """Why Transformer Engine does not import here (None: it does)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken TE install fails with anything, not only ImportError
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return None


@dataclass(frozen=True)
class Kernels:
    """The resolved choices: ``precision`` bf16|fp32, ``attention`` te|sdpa|local, ``recompute`` none|selective|full,
    ``experts`` grouped|sequential."""

    precision: str
    attention: str
    recompute: str
    experts: str

    @classmethod
    def resolve(cls, model: ModelConfig, *, on_gpu: bool, expert_tp: int = 1) -> "Kernels":
        precision = model.precision if model.precision != "auto" else ("bf16" if on_gpu else "fp32")
        attention = model.attention
        if attention == "auto":
            attention = "te" if on_gpu and te_import_error() is None else "sdpa"
        elif attention == "te":
            if not on_gpu:
                raise ConfigError("model.attention=te needs a GPU (Transformer Engine's kernels are CUDA-only); "
                                  "set model.attention=sdpa or auto on this machine")
            error = te_import_error()
            if error is not None:
                raise ConfigError(f"model.attention=te needs Transformer Engine, which does not import here ({error}); "
                                  "install transformer-engine[pytorch] or set model.attention=sdpa (or auto)")
        return cls(precision, attention, model.recompute, _resolve_experts(model, precision, attention, on_gpu, expert_tp))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def grouped_gemm(self) -> bool:
        return self.experts == "grouped"

    def transformer_config_kwargs(self) -> dict:
        """The TransformerConfig fields these choices set."""
        kwargs = dict(bf16=self.precision == "bf16", params_dtype=self.dtype)
        if self.recompute == "selective":
            kwargs.update(recompute_granularity="selective")  # Megatron's default module: core attention
        elif self.recompute == "full":
            kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return kwargs

    def layer_spec(self, config):
        """The decoder block spec: TE's modules, or Megatron's local ones with our core attention for sdpa."""
        if self.attention == "te":
            return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm")
        if self.grouped_gemm:
            install_torch_grouped_gemm()
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        if config.sequence_parallel:
            spec = replace_in_spec(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
        if self.attention == "sdpa":
            spec = replace_in_spec(spec, DotProductAttention, SdpaAttention)
        return spec

    def describe(self) -> str:
        """One line for the run's console, e.g. ``precision bf16 (fp32 main params, fp32 grad reduce) | ...``."""
        precision = "bf16 (fp32 main params, fp32 grad reduce)" if self.precision == "bf16" else "fp32"
        if not self.grouped_gemm:
            experts = "sequential"
        elif self.attention == "te":
            experts = "grouped GEMM (Transformer Engine)"
        else:
            experts = f"grouped GEMM (GroupedMLP, {grouped_gemm_backend()})"
        return f"precision {precision} | attention {self.attention} | experts {experts} | recompute {self.recompute}"


def bind_router_gemm_without_te() -> None:
    """Bind ``te_general_gemm`` to None in Megatron's MoE utilities when Transformer Engine is absent.

    megatron-core 0.16.1's fp32 router GEMM (``moe_utils.router_gating_linear``, used with
    ``moe_router_dtype="fp32"``) tests ``te_general_gemm is not None``, but that name is bound only inside the
    ``try: import transformer_engine`` at the module's top: without TE every MoE forward raises NameError, on a
    GPU node as on CPU. None is Megatron's own "absent" value there, so its torch GEMM runs."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def fused_softmax_available() -> bool:
    """Whether Megatron's fused masked-softmax kernels import (local attention in bf16 on a GPU uses them when
    ``masked_softmax_fusion`` is on). They are CUDA extensions from Apex or Megatron's legacy fused kernels, not in
    our dependencies; Megatron checks only the setting and then fails at its first call (``import
    scaled_masked_softmax_cuda``) instead of falling back to torch's softmax."""
    names = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")
    return all(importlib.util.find_spec(name) is not None for name in names)


def _resolve_experts(model: ModelConfig, precision: str, attention: str, on_gpu: bool, expert_tp: int) -> str:
    experts = model.experts
    if attention == "te":
        return "sequential" if experts == "sequential" else "grouped"
    device = torch.device("cuda" if on_gpu else "cpu")
    # torch's grouped matmul wants 16-byte row strides: bf16 rows of a multiple of 8 elements.
    width = model.moe_ffn_hidden_size // max(1, expert_tp)
    aligned = model.hidden_size % 8 == 0 and width % 8 == 0
    if experts == "auto":
        return "grouped" if on_gpu and precision == "bf16" and aligned and torch_grouped_mm_error(device) is None \
            else "sequential"
    if experts == "grouped":
        if precision != "bf16":
            raise ConfigError("model.experts=grouped without Transformer Engine runs Megatron's GroupedMLP, which "
                              "is bf16 only; set model.precision=bf16 or model.experts=sequential")
        if not aligned:
            raise ConfigError(f"model.experts=grouped: torch's grouped matmul needs model.hidden_size "
                              f"({model.hidden_size}) and each TP rank's expert width (model.moe_ffn_hidden_size / "
                              f"parallel.tp = {width}) to be multiples of 8; change them or set model.experts=sequential")
        error = torch_grouped_mm_error(device)
        if error is not None:
            raise ConfigError(f"model.experts=grouped: torch's grouped matmul does not run on this {device.type} "
                              f"({error}); set model.experts=sequential (or auto)")
    return experts


def replace_in_spec(spec, old: type, new: type):
    """``spec`` (a Megatron ModuleSpec tree) with every reference to module class ``old`` replaced by ``new``."""
    if spec is old:
        return new
    if isinstance(spec, list):
        return [replace_in_spec(s, old, new) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: replace_in_spec(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


class SdpaAttention(DotProductAttention):
    """Megatron's core attention with its scores -> softmax -> context replaced by one call to torch's
    ``scaled_dot_product_attention``.

    Our own module because megatron-core 0.16.1 has no fused attention without Transformer Engine: its local
    ``DotProductAttention`` materialises the [b, heads, s, s] scores and probabilities (out of memory at long
    sequences). SDPA runs flash or memory-efficient kernels on a GPU and a flash kernel on CPU, none of which
    stores an [s, s] matrix. Megatron's ``__init__`` is kept (heads and query groups per TP partition, softmax
    scale), so the module drops into Megatron's layer spec and its tensors stay ``[s, b, heads, dim]``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softmax_offset is not None or self.config.window_size is not None:
            raise ConfigError("model.attention=sdpa supports the vanilla full softmax only (no softmax offset or "
                              "sliding window); set model.attention=local")
        # Megatron divides the scale by the layer number for query-key layer scaling and its softmax multiplies
        # it back: the product is what the scores are scaled by.
        self.scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, heads, dim], key/value [sk, b, groups, dim] -> context [sq, b, heads * dim]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("model.attention=sdpa takes no packed sequences or attention bias; "
                                      "use model.attention=te or local")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        if causal and q.shape[2] != k.shape[2]:
            raise NotImplementedError("model.attention=sdpa: causal attention needs as many keys as queries "
                                      "(no KV-cache inference); use model.attention=local")
        # Megatron's masks are True where attention is forbidden, SDPA's where it is allowed.
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from the tensor-parallel RNG stream outside sequence parallelism, as Megatron's does.
        fork = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with fork:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], self.hidden_size_per_partition)
