"""Let Megatron-core's DistributedOptimizer run on CPU tensors, inside a spawned test rank only.

Its logic (slices of the DDP buffers, norm over the slices, Adam on them, the parameter all-gather,
sharded checkpoints) is device-independent, but it asserts ``param.type() == 'torch.cuda.FloatTensor'``
and allocates a few flags with ``device='cuda'``. CI has no GPU, so to test our integration with it we
redirect exactly those spots to the CPU. This is process-global and must never run in the pytest process
or in the product (``build_model`` refuses ``optim.distributed`` without a GPU); the GPU run itself is
``tests/integration/test_gpu.py``.
"""

from __future__ import annotations

import torch


def redirect_megatron_cuda_to_cpu() -> None:
    plain_type = torch.Tensor.type

    def type_as_if_on_cuda(self, *args, **kwargs):
        name = plain_type(self, *args, **kwargs)
        if args or kwargs or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_as_if_on_cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    for factory in ("tensor", "zeros", "empty", "ones"):
        original = getattr(torch, factory)

        def on_cpu(*args, _original=original, **kwargs):
            if kwargs.get("device") == "cuda" or isinstance(kwargs.get("device"), int):
                kwargs["device"] = "cpu"
            return _original(*args, **kwargs)

        setattr(torch, factory, on_cpu)
