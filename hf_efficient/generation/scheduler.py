"""The engine's scheduler: which requests run, in which slot, with which cache blocks.

It keeps the waiting queue and the active requests (slot ``i`` holds ``active[i]``; slots stay compact, ``0 ..
len(active)-1``, so a step runs the smallest batch bucket covering them) and describes each step as plain data for
the runner:

* :meth:`Scheduler.admit` -> :class:`PrefillBatch`: waiting groups that fit the free slots, the free blocks and the
  prefill token budget, their prompt blocks allocated (a group's samples share them);
* :meth:`Scheduler.reserve` -> :class:`DecodeBatch`: room for ``n_new`` more tokens in every active request
  (growth and copy-on-write through the cache's :class:`~hf_efficient.cache.blocks.BlockManager`), the block-table
  entries that changed, and the longest context; when the free blocks do not cover it, the caller preempts
  (:meth:`preempt`: the newest request goes back to the queue, its tokens so far become its prompt);
* :meth:`retire` frees a request's blocks and moves the last slot into its place (:class:`SlotMove`);
* :meth:`rollback` drops the last ``k`` tokens of a request from the cache (rejected speculative tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from ..cache.allocator import CacheFullError
from ..cache.blocks import BlockManager
from .request import Request


@dataclass
class PrefillBatch:
    """Groups whose prompts (``Request.context`` of the group's first request) are prefilled together; every
    request already holds its group's prompt blocks (``blocks``, ``stored``)."""

    groups: list[list[Request]]

    @property
    def tokens(self) -> int:
        return sum(len(g[0].context) for g in self.groups)


@dataclass
class DecodeBatch:
    """One step over the active slots ``0 .. size-1``, each adding ``n_new`` tokens."""

    size: int
    n_new: int
    updates: list[tuple[int, int, int]]  # block-table entries (slot, column, block) that changed for this step
    longest: int  # longest context (stored tokens, this step's included) of the active requests


class SlotMove(NamedTuple):
    """Retiring a request moved the request in slot ``src`` (the last one) to ``dst``; ``src`` is now free."""

    src: int
    dst: int


class Scheduler:
    """Admission, block reservation, preemption and retirement for one engine.

    Args:
        blocks: the cache's block manager.
        max_batch: slots.
        prefill_tokens: most prompt tokens prefilled together (a longer prompt is admitted alone).
    """

    def __init__(self, blocks: BlockManager, max_batch: int, prefill_tokens: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[list[Request]] = deque()
        self.active: list[Request] = []

    # ------------------------------------------------------------------ admission

    def add(self, group: list[Request]) -> None:
        self.waiting.append(group)

    def admit(self) -> PrefillBatch | None:
        """Take waiting groups that fit (slots, blocks, prefill budget) and give them their prompt blocks."""
        groups: list[list[Request]] = []
        tokens = 0
        free_slots = self.max_batch - len(self.active)
        free_blocks = self.blocks.num_free
        while self.waiting:
            group = self.waiting[0]
            n_tok = len(group[0].context)
            need = self.blocks.blocks_for(n_tok + 1) + len(group)  # the prompt once + a block per sample
            if len(group) > free_slots or need > free_blocks:
                break
            if groups and tokens + n_tok > self.prefill_tokens:
                break
            self.waiting.popleft()
            groups.append(group)
            tokens += n_tok
            free_slots -= len(group)
            free_blocks -= need
        for group in groups:
            prompt_blocks = self.blocks.allocate(len(group[0].context))
            for i, req in enumerate(group):
                req.blocks = self.blocks.share(prompt_blocks) if i else prompt_blocks
                req.stored = len(req.context)
        return PrefillBatch(groups) if groups else None

    def release_batch(self, batch: PrefillBatch) -> None:
        """Give back the blocks of an admitted batch that never became active (its prefill failed)."""
        for group in batch.groups:
            for req in group:
                if req.slot < 0 and req.blocks:
                    self.blocks.release(req.blocks)
                    req.blocks, req.stored = [], 0

    def activate(self, req: Request, hist_from: int) -> None:
        """Give a prefilled request the next slot."""
        req.slot = len(self.active)
        req.hist_from = hist_from  # history columns recorded before it joined are not its tokens
        self.active.append(req)

    def check_progress(self) -> None:
        """Nothing active and a group still waiting: it cannot fit even into the empty cache."""
        if not self.active and self.waiting:
            raise CacheFullError(
                self.blocks.blocks_for(len(self.waiting[0][0].context)), self.blocks.num_free,
                self.blocks.block_size, "a waiting request does not fit even in an empty cache",
            )

    # ------------------------------------------------------------------ decode steps

    def _seqs(self) -> list[tuple[list[int], int]]:
        return [(r.blocks, r.stored) for r in self.active]

    def fits(self, n_new: int = 1) -> bool:
        """The free blocks cover ``n_new`` more tokens for every active request."""
        return self.blocks.needed(self._seqs(), [n_new] * len(self.active)) <= self.blocks.num_free

    def reserve(self, n_new: int = 1) -> DecodeBatch:
        """Room for ``n_new`` more tokens per active request (call :meth:`fits` first; preempt when it fails)."""
        changed = self.blocks.grow(self._seqs(), [n_new] * len(self.active))
        longest = 0
        for req in self.active:
            req.stored += n_new
            longest = max(longest, req.stored)
        updates = [(self.active[i].slot, col, blk) for i, col, blk in changed]
        return DecodeBatch(len(self.active), n_new, updates, longest)

    def rollback(self, req: Request, k: int) -> None:
        """Drop the last ``k`` stored tokens of ``req`` (rejected speculative tokens); emptied blocks are freed.
        The caller rewinds the slot's position on the device."""
        if not 0 <= k <= req.stored:
            raise ValueError(f"rollback of {k} tokens, but the request stores {req.stored}")
        req.stored -= k
        self.blocks.crop(req.blocks, req.stored)

    def preempt(self) -> tuple[Request, SlotMove | None]:
        """Out of blocks: the newest request goes back to the front of the queue (its output so far becomes part
        of its prompt; its sampler stream continues where it stopped)."""
        if len(self.active) <= 1:
            raise CacheFullError(1, self.blocks.num_free, self.blocks.block_size,
                                 "a single request does not fit in the cache")
        victim = self.active[-1]
        move = self.retire(victim)
        victim.seed_offset = len(victim.output)
        victim.preemptions += 1
        self.waiting.appendleft([victim])
        return victim, move

    # ------------------------------------------------------------------ retirement

    def retire(self, req: Request) -> SlotMove | None:
        """Free a request's blocks and its slot; the last active request moves into the freed slot."""
        self.blocks.release(req.blocks)
        req.blocks = []
        i, last = req.slot, len(self.active) - 1
        if self.active[i] is not req:
            raise RuntimeError(f"request {req.rid} is not in slot {i}")
        move = None
        if i != last:
            moved = self.active[last]
            self.active[i] = moved
            moved.slot = i
            move = SlotMove(last, i)
        self.active.pop()
        req.slot = -1
        return move

    def clear(self) -> list[Request]:
        """Drop every active and waiting request (after an error): their blocks are freed. Returns the active
        requests that were dropped (their slots are ``0 .. len-1`` before the call)."""
        dropped = list(self.active)
        for req in dropped:
            self.blocks.release(req.blocks)
            req.blocks, req.slot = [], -1
        self.active.clear()
        self.waiting.clear()
        return dropped

    def holders(self) -> list[list[int]]:
        """Block lists of the active requests (for consistency checks)."""
        return [r.blocks for r in self.active]
