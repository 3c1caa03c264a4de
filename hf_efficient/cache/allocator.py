"""Block allocator of the paged KV cache: a free list with reference counts (for shared prefix blocks)."""

from __future__ import annotations


class CacheFullError(RuntimeError):
    """The paged cache has too few free blocks for a request. Nothing was changed by the failed request."""

    def __init__(self, needed: int, free: int, block_size: int, detail: str = ""):
        self.needed, self.free, self.block_size = needed, free, block_size
        msg = (
            f"PagedCache is out of blocks: the request needs {needed} block(s) of {block_size} tokens "
            f"but only {free} are free"
        )
        if detail:
            msg += f" ({detail})"
        msg += "; create the cache with a larger max_tokens/num_blocks, or free sequences first"
        super().__init__(msg)


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks-1``; a block returns to the free list when its refcount drops to 0."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def free_blocks(self) -> list[int]:
        """Ids of the free blocks (a copy)."""
        return list(self._free)

    def check(self, needed: int, detail: str = "") -> None:
        if needed > len(self._free):
            raise CacheFullError(needed, len(self._free), self.block_size, detail)

    def allocate(self, n: int) -> list[int]:
        self.check(n)
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} is not allocated")
            self._ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than allocated")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def reset(self) -> None:
        self.__init__(self.num_blocks, self.block_size)
