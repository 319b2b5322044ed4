"""The bounded cache behind the optimizer's per-step lookups."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(OrderedDict, Generic[V]):
    """At most ``size`` entries; the least recently used go first. Values made
    per pattern (missing-grad indices, group configurations, per-group
    constants) would otherwise grow without bound when every step brings a new one."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __reduce__(self):  # copy and pickle: OrderedDict's would call cls() without a size
        return type(self), (self.size,), None, None, iter(self.items())

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made (by ``make``, which may raise: nothing is kept then) if absent."""
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            if len(self) > self.size:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value
