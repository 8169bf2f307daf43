"""Table rows between host RAM and the GPU, off the compute stream.

The table lives in host RAM; each micro-batch's rows go to the GPU and their gradients come back. A plain
``rows.to("cuda")`` from pageable memory is a staged, synchronous copy on the compute stream. Here rows are
staged in pinned buffers and copied on a side stream; the compute stream waits on the copy's event only where
the rows are used (the first Engram layer), so a copy started early (by the prefetch thread, as soon as the
lookup returns) overlaps the layers below. On a CPU device both directions are the identity.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class DeviceRows:
    """Rows on their way to the device: read ``rows`` only after ``RowTransfer.wait``."""

    rows: torch.Tensor
    ready: torch.cuda.Event | None  # None: already usable (CPU, or a synchronous copy)


class _Staging:
    """Two pinned buffers used in turn, so a buffer is refilled only after its previous copy has finished."""

    def __init__(self):
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, like: torch.Tensor) -> tuple[int, torch.Tensor]:
        slot, self.turn = self.turn, self.turn ^ 1
        if self.done[slot] is not None:
            self.done[slot].synchronize()
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype:
            buffer = self.buffers[slot] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
        return slot, buffer[: like.numel()].view(like.shape)


class RowTransfer:
    """Host-to-device copies of looked-up rows and device-to-host copies of their gradients, for one device.

    ``to_device`` may run on the prefetch thread; ``wait`` and ``to_host`` run on the training thread. One
    instance per device and process (``for_device``), so the pinned buffers are allocated once.
    """

    _instances: dict[torch.device, "RowTransfer"] = {}
    _lock = threading.Lock()

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.on_gpu else None
        self._rows, self._grads = _Staging(), _Staging()

    @classmethod
    def for_device(cls, device: torch.device) -> "RowTransfer":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with cls._lock:
            if device not in cls._instances:
                cls._instances[device] = cls(device)
            return cls._instances[device]

    def to_device(self, rows: torch.Tensor) -> DeviceRows:
        """Start copying host ``rows`` to the device (from any thread); ``wait`` before reading the result."""
        if not self.on_gpu:
            return DeviceRows(rows, None)
        with torch.cuda.device(self.device):  # the prefetch thread's current device is otherwise cuda:0
            slot, staged = self._rows.take(rows)
            staged.copy_(rows.detach())
            with torch.cuda.stream(self.stream):
                on_device = staged.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            self._rows.done[slot] = ready
        return DeviceRows(on_device, ready)

    def wait(self, pending: DeviceRows) -> torch.Tensor:
        """The rows, once the compute stream has been made to wait for their copy (nothing blocks the host)."""
        if pending.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(pending.ready)
            pending.rows.record_stream(compute)  # allocated on the side stream, used and freed on this one
        return pending.rows

    def to_host(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` in host memory, valid until the call after next (the table consumes it at once).

        The host needs it immediately (it goes to the rows' owners), so this waits for the copy; the pinned buffer
        makes it a DMA at full bandwidth on the side stream instead of a staged copy on the compute stream.
        """
        if not self.on_gpu:
            return grad
        slot, staged = self._grads.take(grad)
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(self.device))  # after the backward that produced grad
        self.stream.wait_event(written)
        with torch.cuda.stream(self.stream):
            staged.copy_(grad, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        grad.record_stream(self.stream)
        self._grads.done[slot] = done
        done.synchronize()
        return staged
