"""The forward traces of recent prompts, kept so that requests on one prompt share its pass."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from engine.capture import ForwardTrace, trace_forward_many
from engine.families import Family

Key = tuple[int, ...]


class TraceCache:
    """An LRU of forward traces by prompt, bounded by count and, optionally, bytes.

    Thread-safe: the service reads it from its worker and clears it from others.

    Args:
        size: traces kept (0: none kept; every call runs the forward pass).
        max_bytes: also evict the oldest while the cache holds more bytes than this (the
            newest trace may stay alone above it); ``None``: no byte limit.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        size: int,
        max_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.family = family
        self.size = size
        self.max_bytes = max_bytes
        self._traces: OrderedDict[Key, ForwardTrace] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._traces)

    def get_many(self, prompts: Sequence[Sequence[int]]) -> list[ForwardTrace]:
        """Traces of ``prompts``; those not cached come from one batched forward pass."""
        keys = [tuple(int(i) for i in ids) for ids in prompts]
        with self._lock:
            found = {key: self._traces[key] for key in keys if key in self._traces}
            for key in found:
                self._traces.move_to_end(key)
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            tensors = [torch.tensor(key, dtype=torch.long) for key in missing]
            made = trace_forward_many(self.model, self.family, tensors)
            found |= dict(zip(missing, made, strict=True))
            with self._lock:
                self._traces.update(zip(missing, made, strict=True))
                while self._traces and self._over_limits():
                    self._traces.popitem(last=False)
        return [found[key] for key in keys]

    def make_room(self, needed_bytes: int, budget_bytes: int, keep: set[Key]) -> None:
        """Evict traces (oldest first, not those in ``keep``) until the cache and a request
        needing ``needed_bytes`` fit ``budget_bytes`` together."""
        with self._lock:
            for key in list(self._traces):
                if self._nbytes() + needed_bytes <= budget_bytes:
                    break
                if key not in keep:
                    del self._traces[key]

    def clear(self) -> None:
        """Drop every trace."""
        with self._lock:
            self._traces.clear()

    def _over_limits(self) -> bool:
        if len(self._traces) > self.size:
            return True
        if self.max_bytes is None or len(self._traces) < 2:
            return False
        return self._nbytes() > self.max_bytes

    def _nbytes(self) -> int:
        return sum(trace.nbytes() for trace in self._traces.values())
