"""Peak tensor memory of a block of code, on CPU as well as on GPUs.

CUDA has allocator statistics (`torch.cuda.max_memory_allocated`); the CPU allocator has none. On
CPU the peak is tracked from the tensors themselves: a dispatch mode sees every tensor an operator
creates and a weak reference on its storage sees it freed, so the count is the live bytes of
tensor storage allocated inside the block (what a graph kept for backward costs), not the
process's resident size.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _reference: weakref.ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(outputs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage not in self._storages:
                    nbytes = storage.nbytes()
                    self._storages[storage] = weakref.ref(storage, lambda ref, n=nbytes: self._freed(n, ref))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return outputs


class PeakMemory:
    """The result of `peak_memory()`: `bytes` is filled in when the block exits."""

    bytes: int = 0


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak of tensor memory allocated inside the block, in bytes, above what was live before.

    Example:
        >>> with peak_memory() as peak:
        ...     run()
        >>> peak.bytes
    """
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - baseline
        return
    tracker = _LiveTensorBytes()
    with tracker:
        yield result
    result.bytes = tracker.peak
