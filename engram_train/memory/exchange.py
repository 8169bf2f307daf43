"""All-to-all over the table's gloo group, with a no-communication path for a one-rank group.

gloo in torch 2.13 implements ``all_to_all_single`` with uneven splits (checked on this stack), so
the exchange is the same three collectives TorchRec's row-wise sharding uses: counts, ids, rows.
With one rank every exchange is the identity, so the table runs the same code without a process
group (``group=None``) and without ``torch.distributed`` being initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RowExchange:
    """Rank/world of the table group plus the variable-size all-to-all the table needs."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        if group is None:
            self.rank, self.world = 0, 1
        else:
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            backend = dist.get_backend(group)
            if backend != "gloo":
                # Rows live in host RAM; a NCCL group would force them through the GPU.
                raise ValueError(
                    f"ShardedEngramTable needs a gloo process group for its host-RAM rows, got backend {backend!r}; "
                    "create one with dist.new_group(ranks, backend='gloo')"
                )

    def counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """Tell every peer how many items it will receive from us; returns what we will receive."""
        if self.world == 1:
            return send_counts
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv

    def send(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Send ``tensor``'s first-dim blocks of ``send_counts`` rows to ranks 0..world-1 in order."""
        if self.world == 1:
            return tensor
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        dist.all_to_all_single(
            out, tensor.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group
        )
        return out

    def all_gather_object(self, obj: object) -> list[object]:
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out
