"""Block manager of the paged KV cache: which blocks each sequence holds, and how that changes.

A sequence is a list of block ids plus the number of tokens it stores; token ``p`` of a sequence lives in pool slot
``blocks[p // block_size] * block_size + p % block_size`` (:meth:`BlockManager.slots`, the only place that formula
is written). Both users of the pools go through this class: :class:`~hf_efficient.cache.paged.PagedCache` (one
sequence per batch row of ``model.generate``) and the decode engine's scheduler (one per request). It owns

* growth: blocks for new tokens, plus a private copy of a shared partial block before it is written
  (copy-on-write), decided for a whole step at once and applied only when every block it needs is free;
* sharing: :meth:`share` gives another sequence (a sample of the same prompt, a beam) the same blocks;
* rollback: :meth:`crop` drops a sequence's last tokens (rejected speculative tokens) and frees emptied blocks.

Operations that fail (:class:`CacheFullError`) change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .allocator import BlockAllocator, CacheFullError

__all__ = ["BlockManager", "CacheFullError"]


class BlockManager:
    """Allocation, sharing, copy-on-write growth and crop of sequences' block lists.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        copy_block: ``copy_block(src, dst)`` copies a block's K/V in every layer (copy-on-write). ``None``: the
            pools do not exist yet (nothing to copy).
    """

    def __init__(self, num_blocks: int, block_size: int, copy_block: Callable[[int, int], None] | None = None):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.copy_block = copy_block

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return math.ceil(tokens / self.block_size)

    # ------------------------------------------------------------------ addressing

    def slots(self, blocks: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat pool slots (int64, CPU) of tokens ``start .. end-1`` of a sequence holding ``blocks``."""
        bs = self.block_size
        pos = torch.arange(start, end)
        if end <= start:
            return pos
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // bs] * bs + pos % bs

    # ------------------------------------------------------------------ allocation and sharing

    def allocate(self, tokens: int) -> list[int]:
        """Fresh blocks for a new sequence of ``tokens`` tokens."""
        return self.allocator.allocate(self.blocks_for(tokens))

    def share(self, blocks: Sequence[int]) -> list[int]:
        """The same blocks for one more sequence (copy-on-write on the first write into a shared partial block)."""
        self.allocator.incref(blocks)
        return list(blocks)

    def release(self, blocks: Sequence[int]) -> None:
        self.allocator.release(blocks)

    def crop(self, blocks: list[int], keep: int) -> None:
        """Keep the first ``keep`` tokens of a sequence: blocks past them are released (in place)."""
        need = self.blocks_for(keep)
        self.allocator.release(blocks[need:])
        del blocks[need:]

    # ------------------------------------------------------------------ growth

    def _plan(self, seqs: Sequence[tuple[list[int], int]], n_new: Sequence[int]) -> tuple[list[int], list[bool]]:
        """Blocks each sequence grows by and whether it copies its shared last block first. A shared partial block
        is copied by each writer except the last one still holding it (simulated in order)."""
        bs, grow, cow, refs = self.block_size, [], [], {}
        for (blocks, length), n in zip(seqs, n_new):
            grow.append(max(0, self.blocks_for(length + n) - len(blocks)))
            copy = False
            if length % bs and n > 0:
                last = blocks[length // bs]
                refs.setdefault(last, self.allocator.refcount(last))
                copy = refs[last] > 1
                refs[last] -= copy
            cow.append(copy)
        return grow, cow

    def needed(self, seqs: Sequence[tuple[list[int], int]], n_new: Sequence[int]) -> int:
        """Free blocks that :meth:`grow` with the same arguments takes."""
        grow, cow = self._plan(seqs, n_new)
        return sum(grow) + sum(cow)

    def grow(self, seqs: Sequence[tuple[list[int], int]], n_new: Sequence[int], detail: str = "") -> list[tuple]:
        """Make room for ``n_new[i]`` more tokens after the ``length`` stored tokens of each ``(blocks, length)``.

        Block lists are changed in place (lengths are the caller's). Returns the block-table entries that changed,
        ``(sequence index, column, block)``. Raises :class:`CacheFullError` before changing anything when the free
        blocks do not cover the step.
        """
        grow, cow = self._plan(seqs, n_new)
        self.allocator.check(sum(grow) + sum(cow), detail=detail)
        changed = []
        for i, ((blocks, length), g, c) in enumerate(zip(seqs, grow, cow)):
            if c:
                col = length // self.block_size
                old = blocks[col]
                (new,) = self.allocator.allocate(1)
                if self.copy_block is not None:
                    self.copy_block(old, new)
                self.allocator.release([old])
                blocks[col] = new
                changed.append((i, col, new))
            if g:
                start = len(blocks)
                blocks.extend(self.allocator.allocate(g))
                changed.extend((i, start + j, blocks[start + j]) for j in range(g))
        return changed

    # ------------------------------------------------------------------ integrity

    def check_refcounts(self, holders: Sequence[Sequence[int]]) -> None:
        """Raise ``AssertionError`` unless every block's refcount equals the number of ``holders`` (block lists)
        holding it, and the free list holds exactly the unreferenced blocks (a consistency check for tests and
        debugging)."""
        counts = [0] * self.allocator.num_blocks
        for blocks in holders:
            for b in blocks:
                counts[b] += 1
        refs = [self.allocator.refcount(b) for b in range(self.allocator.num_blocks)]
        assert refs == counts, "block refcounts differ from the block lists that hold them"
        free = self.allocator.free_blocks()
        assert sorted(free) == [b for b, c in enumerate(counts) if c == 0], "free list differs from unreferenced blocks"
