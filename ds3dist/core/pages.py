"""A pool of fixed-size cache pages (one per expert-parallel column).

The scheduler owns the pool; workers only see page ids in step plans. Pages are handed out
lowest id first.
"""

from __future__ import annotations

import heapq
from typing import Iterable


class OutOfPages(RuntimeError):
    """allocate() asked for more pages than are free."""


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages))  # a heap, already sorted
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold num_tokens tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, only {len(self._free)} of {self.num_pages} free")
        pages = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool; all or none (ValueError on a page not allocated)."""
        pages = list(pages)
        bad = [p for p in pages if p not in self._used]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"cannot free pages {bad or pages}: not allocated from this pool, "
                             f"already free or listed twice")
        self._used.difference_update(pages)
        for p in pages:
            heapq.heappush(self._free, p)
