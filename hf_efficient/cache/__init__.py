"""Paged KV cache: block allocator and the transformers ``Cache`` subclass."""

from .allocator import BlockAllocator, CacheFullError
from .paged import PagedCache

__all__ = ["BlockAllocator", "CacheFullError", "PagedCache"]
