"""The per-process cache of client datasets: least recently used first out, bounded in bytes.

A worker process may train thousands of clients one after another, so the datasets it has
loaded cannot all stay in memory. One store, :data:`CLIENT_DATA_CACHE`, holds them for the
whole process, whatever their kind: the image splits of
:func:`fedml_api.data.client_data.load_client_split` and the YOLO datasets of
:class:`fedml_api.model.YOLOv3.YOLOv3Trainer`. Its budget is therefore the memory the
process spends on cached client data, of all kinds together.

The budget is set with :func:`set_cache_budget` (re-exported by
:mod:`fedml_api.data.client_data`, where users look for it):

* ``None`` (the default): unbounded, every dataset stays loaded. Right when a process is
  one client, which reads the same files every round.
* ``0``: nothing is kept; every load reads the files again.
* ``n > 0``: at most ``n`` bytes; the least recently used entries are evicted to make room,
  and an entry larger than ``n`` on its own is handed to its caller but not kept.

The worker sets it once at start-up from its command line (``--client_cache_mb M`` ->
``set_cache_budget(M * 2**20)``; option absent -> leave it ``None``).

Evicting an entry only drops the cache's reference: a caller still holding the dataset
keeps it alive until it lets go, so the budget bounds what the cache keeps, not what the
process's callers hold.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from typing import Any, Hashable, NamedTuple, Optional


class CacheInfo(NamedTuple):
    """A snapshot of a :class:`MemoryBudgetLRU`, for tests, logs and benchmarks.

    Attributes:
        entries: Entries held now.
        bytes: Their total size, as given to :meth:`MemoryBudgetLRU.put`.
        max_bytes: The budget (``None``: unbounded).
        hits: Lookups answered from the cache.
        misses: Lookups that found nothing, or an entry of another version (stale).
        evictions: Entries dropped to stay within the budget (not counting stale ones
            replaced, nor ones never kept).
        rejected: Entries not kept because they were larger than the whole budget (with a
            budget of 0, every entry).
    """

    entries: int
    bytes: int
    max_bytes: Optional[int]
    hits: int
    misses: int
    evictions: int
    rejected: int


class _Entry(NamedTuple):
    value: Any
    nbytes: int
    version: Hashable


class MemoryBudgetLRU:
    """A thread-safe mapping that keeps at most ``max_bytes`` of values, least recently
    used out first.

    The caller states each value's size when it stores it (:meth:`put`), and may store it
    again to update that size (a dataset that fills as it is read). Each entry may carry a
    ``version`` (say a file's mtime and size): a lookup with another version finds nothing
    and drops the stale entry.

    Every method holds one lock for a few dictionary operations only; loading a value is
    the caller's business, outside it (two threads missing the same key both load it, and
    the later :meth:`put` wins).
    """

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self._lock = threading.Lock()
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._max_bytes = _check_budget(max_bytes)
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._rejected = 0

    def get(self, key: Hashable, version: Hashable = None) -> Optional[Any]:
        """The value stored under ``key`` with this ``version`` (it becomes the most recently
        used), else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version == version:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry.value
            if entry is not None:  # stale: of no use to anyone any more
                self._drop(key)
            self._misses += 1
            return None

    def put(self, key: Hashable, value: Any, nbytes: int, version: Hashable = None) -> bool:
        """Store ``value`` (of ``nbytes`` bytes) as the most recently used entry, replacing
        any entry of ``key``, and evict the least recently used ones until the total fits.

        Returns:
            Whether it was kept: a value larger than the whole budget is not (and evicts
            nothing), though the entry it replaces is dropped all the same.
        """
        if value is None:
            raise ValueError("cannot cache None: get() returns None for a missing entry")
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if self._max_bytes is not None and nbytes > self._max_bytes:
                self._rejected += 1
                return False
            self._entries[key] = _Entry(value, nbytes, version)
            self._bytes += nbytes
            self._evict_to_budget()
            return True

    def discard(self, key: Hashable) -> None:
        """Drop the entry of ``key``, if there is one."""
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def set_max_bytes(self, max_bytes: Optional[int]) -> None:
        """Change the budget; a smaller one evicts least recently used entries at once."""
        max_bytes = _check_budget(max_bytes)
        with self._lock:
            self._max_bytes = max_bytes
            self._evict_to_budget()

    def clear(self) -> None:
        """Drop every entry and zero the counters (the budget stays)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._hits = self._misses = self._evictions = self._rejected = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                rejected=self._rejected,
            )

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` has an entry (of any version); neither a hit nor a miss, and it
        does not make the entry recent."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # Callers hold the lock.
    def _drop(self, key: Hashable) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def _evict_to_budget(self) -> None:
        if self._max_bytes is None:
            return
        while self._bytes > self._max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self._evictions += 1


def _check_budget(max_bytes: Optional[int]) -> Optional[int]:
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool):
        raise TypeError("the cache budget is a number of bytes or None, not a bool")
    try:
        max_bytes = operator.index(max_bytes)
    except TypeError:
        raise TypeError(
            f"the cache budget is a whole number of bytes or None, got {max_bytes!r}"
        ) from None
    if max_bytes < 0:
        raise ValueError(
            f"the cache budget must be >= 0 bytes (or None: unbounded), got {max_bytes}"
        )
    return max_bytes


#: The process's cache of client datasets (see the module docstring).
CLIENT_DATA_CACHE = MemoryBudgetLRU()


def set_cache_budget(max_bytes: Optional[int]) -> None:
    """Bound the memory this process keeps in cached client datasets, of every kind.

    Args:
        max_bytes: ``None``: unbounded (the default, for one client per process); ``0``: no
            caching; ``n``: at most ``n`` bytes, least recently used datasets evicted first
            (at once, if more is cached now). A dataset larger than ``n`` is loaded for its
            caller but not kept.

    Meant to be called once, at start-up, by a worker that trains many clients, from its
    ``--client_cache_mb`` option (``set_cache_budget(args.client_cache_mb * 2**20)``).

    Raises:
        TypeError: ``max_bytes`` is neither ``None`` nor an integer.
        ValueError: ``max_bytes`` is negative.
    """
    CLIENT_DATA_CACHE.set_max_bytes(max_bytes)


def cache_info() -> CacheInfo:
    """Entries, bytes, budget, hits, misses, evictions and rejections of the process's
    client-data cache (see :class:`CacheInfo`)."""
    return CLIENT_DATA_CACHE.info()


def clear_cache() -> None:
    """Empty the process's client-data cache and zero its counters (the budget stays)."""
    CLIENT_DATA_CACHE.clear()
