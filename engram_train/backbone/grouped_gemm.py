"""Grouped expert GEMMs without Transformer Engine: torch's own grouped matmul behind Megatron's legacy ``GroupedMLP``.

megatron-core 0.16.1 runs experts as one grouped GEMM either through TE (``TEGroupedMLP``) or through its legacy
``GroupedMLP``, which calls ``grouped_gemm.ops.gmm`` from the CUDA-only ``grouped_gemm`` package (built from git,
not on PyPI). torch ships the same operation as ``torch._grouped_mm`` (CUTLASS grouped GEMM on Hopper and newer,
a CPU kernel too), so where that package is missing we give Megatron's ``grouped_gemm_util`` an ``ops`` whose
``gmm`` is torch's: Megatron's module, parameter layout and checkpoint format stay as they are. Ours by hand only
because no library exposes torch's op under the package's interface (three lines below).
"""

from __future__ import annotations

import functools
import types

import torch
from megatron.core.transformer.moe import grouped_gemm_util


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm``: rows ``a[start_e:end_e]`` times ``b[e]`` for each expert e, ``batch_sizes[e]`` rows
    each (a [tokens, k], b [experts, k, n], or [experts, n, k] with ``trans_b``)."""
    # Megatron's dispatcher hands the sizes over on the host (already synchronised there): sum them there and copy
    # without blocking, not a blocking copy that would drain the GPU before every grouped GEMM.
    offsets = torch.cumsum(batch_sizes, dim=0, dtype=torch.int32).to(a.device, non_blocking=True)
    return torch._grouped_mm(a, b.transpose(-1, -2) if trans_b else b, offs=offsets)


@functools.cache
def torch_grouped_mm_error(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why torch's grouped matmul does not run here (None: it does), from one tiny call with a gradient; probed once
    per device and dtype in a process (every model build asks)."""
    try:
        a = torch.ones(8, 8, dtype=dtype, device=device, requires_grad=True)
        b = torch.ones(2, 8, 8, dtype=dtype, device=device, requires_grad=True)
        out = gmm(a, b, torch.tensor([3, 5]))
        out.backward(torch.ones_like(out))
    except Exception as error:  # noqa: BLE001 - unsupported devices fail with RuntimeError or NotImplementedError
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return None


def grouped_gemm_backend() -> str:
    """What Megatron's ``GroupedMLP`` multiplies with here: the ``grouped_gemm`` package where it imports, else
    torch's op (after ``install_torch_grouped_gemm``)."""
    package = grouped_gemm_util.grouped_gemm
    return "grouped_gemm package" if package is not None and not getattr(package, "is_torch_shim", False) \
        else "torch._grouped_mm"


def install_torch_grouped_gemm() -> None:
    """Make Megatron's ``GroupedMLP`` usable: torch's op where the ``grouped_gemm`` package does not import."""
    if grouped_gemm_backend() == "grouped_gemm package":
        return
    shim = types.SimpleNamespace(is_torch_shim=True, ops=types.SimpleNamespace(gmm=gmm))
    grouped_gemm_util.grouped_gemm = shim
    grouped_gemm_util.ops = shim.ops
