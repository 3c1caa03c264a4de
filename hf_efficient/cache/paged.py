"""``PagedCache``: a transformers ``Cache`` that stores K/V in fixed-size blocks addressed by block tables.

Every attention layer owns a preallocated pool ``(num_blocks, block_size, nheads_k, headdim)`` for keys and one for
values; all layers share one :class:`~hf_efficient.cache.allocator.BlockAllocator` and one block table per
sequence, so a sequence occupies ``ceil(len / block_size)`` blocks in every layer and nothing more. Padding tokens
are never stored (the attention drops them before writing), sequences can share prompt blocks (:meth:`fork`,
``batch_repeat_interleave``, ``reorder_cache``) with copy-on-write of a shared partial block, and :meth:`crop` rolls
back rejected speculative tokens.

Usage (the model must use ``attn_implementation="hf_efficient"``, whose attention writes into and reads from the
pools)::

    cache = hf_efficient.PagedCache(model.config, max_tokens=64 * 2048, block_size=16)
    out = model.generate(**batch, past_key_values=cache)

transformers sees the cache as a padded batch: :meth:`get_seq_length` is the padded length of the batch, which is
what ``generate`` uses for positions; the per-sequence lengths of real tokens are :attr:`seq_lens`.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .allocator import CacheFullError
from .blocks import BlockManager

__all__ = ["PagedCache", "CacheFullError"]

# key tensor id -> layer, set by PagedLayer.update and consumed by the attention of the same layer call.
_PENDING: dict[int, tuple[weakref.ref, PagedLayer]] = {}


def consume_pending(key: torch.Tensor) -> PagedLayer | None:
    """The paged layer whose ``update`` returned ``key`` (the attention then owns the write), if any."""
    entry = _PENDING.pop(id(key), None)
    if entry is None or entry[0]() is not key:
        return None
    return entry[1]


class PagedLayer(CacheLayerMixin):
    """One attention layer's pools. Bookkeeping lives in the parent :class:`PagedCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: PagedCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.k_pool: torch.Tensor | None = None
        self.v_pool: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self._cache
        _, nheads_k, _, dim = key_states.shape
        shape = (c.num_blocks, c.block_size, nheads_k, dim)
        self.k_pool = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        self.v_pool = torch.empty(
            (*shape[:-1], value_states.shape[-1]), dtype=value_states.dtype, device=value_states.device
        )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Called by the model before attention: returns the new k/v unchanged and marks them for the attention,
        which writes them into the pools (it knows which tokens are padding) and attends over the pages."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stale = [k for k, (ref, layer) in _PENDING.items() if layer._cache is self._cache]
        if stale:
            for k in stale:
                _PENDING.pop(k, None)
            raise RuntimeError(
                "PagedCache was updated but the attention never consumed it: a PagedCache needs the model to "
                "use attn_implementation='hf_efficient'"
            )
        _PENDING[id(key_states)] = (weakref.ref(key_states), self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.padded_len + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.padded_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:  # bookkeeping is reset by the parent
        pass


@dataclass
class StepPlan:
    """Where one forward step's tokens go; computed at the first layer, reused by every layer."""

    q_len: int
    lens_before: list[int]  # real tokens stored per sequence before the step
    n_new: list[int]  # real new tokens per sequence
    q_idx: torch.Tensor | None  # (total_new,) rows of the flattened (batch * q_len) queries that are real
    write_slots: torch.Tensor  # (total_new,) flat pool slots (block * block_size + offset), in q_idx order
    block_table: torch.Tensor  # int32 (batch, max_blocks) on the pools' device; unused entries are 0
    cache_seqlens: torch.Tensor  # int32 (batch,) real tokens per sequence after the step
    write_rows: torch.Tensor | None = None  # rows of the real new tokens to store (None: all); groups store once
    group_check: tuple | None = None  # (leader rows, follower rows) compared once, at the first layer
    max_seqlen: int | None = None  # bound on cache_seqlens that plans the decode kernel's KV splits (None: capacity)
    seqs: list[tuple[list[int], int]] | None = None  # (blocks, stored tokens) per sequence for gathering (None: the
    # cache's own sequences)
    _gather: tuple | None = None


class PagedCache(Cache):
    """Paged KV cache for ``model.generate(..., past_key_values=cache)`` and the decode engine.

    Args:
        config: the model's config (layer count; every layer must be an attention layer).
        max_tokens: capacity in tokens across all sequences (rounded up to whole blocks). Give this or
            ``num_blocks``.
        num_blocks: capacity in blocks.
        block_size: tokens per block (a power of two, 16 to 256).
        prompt_group_size: the batch arrives as groups of this many identical prompts (``generate(...,
            num_return_sequences=n)`` repeats each prompt ``n`` times): the first step stores each group's prompt
            once and the group shares its blocks (copy-on-write afterwards).
    """

    def __init__(
        self,
        config,
        max_tokens: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        prompt_group_size: int = 1,
    ):
        prompt_group_size = _int_arg("prompt_group_size", prompt_group_size)
        block_size = _int_arg("block_size", block_size)
        max_tokens = _int_arg("max_tokens", max_tokens, optional=True)
        num_blocks = _int_arg("num_blocks", num_blocks, optional=True)
        if prompt_group_size < 1:
            raise ValueError(f"prompt_group_size must be >= 1, got {prompt_group_size}")
        self.prompt_group_size = prompt_group_size
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if (max_tokens is None) == (num_blocks is None):
            raise ValueError("give exactly one of max_tokens and num_blocks")
        if num_blocks is None:
            if max_tokens <= 0:
                raise ValueError(f"max_tokens must be positive, got {max_tokens}")
            num_blocks = math.ceil(max_tokens / block_size)
        elif num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ValueError(f"PagedCache serves attention layers only; this model has layer types {bad}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = BlockManager(num_blocks, block_size, copy_block=self._copy_block)
        self.allocator = self.blocks.allocator
        super().__init__(layers=[PagedLayer(self, i) for i in range(len(layer_types))])
        self.seq_blocks: list[list[int]] = []
        self.seq_lens: list[int] = []
        # per sequence, the padded positions [start, end) that hold no token of it (padding), in order
        self.seq_pads: list[list[tuple[int, int]]] = []
        self.padded_len = 0
        self.plan: StepPlan | None = None
        # set by a caller that plans its own steps (the decode engine): attention then runs `plan` as given
        self.external_plan = False

    def _copy_block(self, src: int, dst: int) -> None:
        for layer in self.layers_initialized:
            layer.k_pool[dst].copy_(layer.k_pool[src])
            layer.v_pool[dst].copy_(layer.v_pool[src])

    def zero_block(self, block: int) -> None:
        """Fill a block's keys and values with zeros in every layer (a scratch block for idle batch rows)."""
        for layer in self.layers_initialized:
            layer.k_pool[block].zero_()
            layer.v_pool[block].zero_()

    def use_plan(self, plan: StepPlan) -> None:
        """Run the next forward with ``plan`` (write slots, block table, lengths) instead of planning it from the
        cache's own sequences: for callers that keep their own block lists (the decode engine). Attention gathers
        stored tokens through ``plan.seqs`` when the plan needs them."""
        self.external_plan = True
        self.plan = plan

    # ------------------------------------------------------------------ transformers Cache API

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.padded_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.padded_len + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.padded_len

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def is_croppable(self) -> bool:
        return True

    def reset(self) -> None:
        self.allocator.reset()
        self.seq_blocks, self.seq_lens, self.seq_pads, self.padded_len, self.plan = [], [], [], 0, None

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last positions of the padded batch (rejected speculative tokens), as ``DynamicCache.crop``
        does; emptied blocks are freed.

        Follows transformers: a negative value removes that many positions; a non-negative value is the legacy
        form, the padded length to keep. Each sequence loses only the tokens it has in the removed positions: a
        sequence whose tokens end earlier (a right-padded prompt) loses fewer tokens, or none.
        """
        tokens_to_remove = _int_arg("tokens_to_remove", tokens_to_remove)
        remove = -tokens_to_remove if tokens_to_remove < 0 else self.padded_len - tokens_to_remove
        remove = min(max(remove, 0), self.padded_len)
        if remove == 0:
            return
        new_len = self.padded_len - remove
        for i, n in enumerate(self.seq_lens):
            pads = self.seq_pads[i]
            padding = sum(max(0, end - max(start, new_len)) for start, end in pads)
            self.seq_pads[i] = [(start, min(end, new_len)) for start, end in pads if start < new_len]
            self._shrink(i, max(0, n - (remove - padding)))
        self.padded_len = new_len
        self.plan = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex([int(i) for i in indices.tolist()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reindex([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.fork(repeats)

    # ------------------------------------------------------------------ sequences

    def fork(self, n: int) -> None:
        """Repeat every sequence ``n`` times in place (``[a, b] -> [a, a, b, b]`` for ``n=2``), sharing blocks.

        The copies share all their blocks; the first write into a shared partial block copies it first
        (copy-on-write), so ``n`` samples of one prompt store the prompt once.
        """
        n = _int_arg("n", n)
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        self._reindex([i for i in range(self.batch_size) for _ in range(n)])

    def _check_indices(self, indices: list[int]) -> None:
        bad = [i for i in indices if not 0 <= i < self.batch_size]
        if bad:
            raise IndexError(
                f"sequence index {bad[0] if len(bad) == 1 else bad} out of range for a PagedCache holding "
                f"{self.batch_size} sequence(s) (valid: 0..{self.batch_size - 1}; negative indices are not accepted)"
            )

    def _reindex(self, order: list[int]) -> None:
        self._check_indices(order)
        new_blocks = [self.blocks.share(self.seq_blocks[i]) for i in order]
        for blocks in self.seq_blocks:
            self.blocks.release(blocks)
        self.seq_blocks = new_blocks
        self.seq_lens = [self.seq_lens[i] for i in order]
        self.seq_pads = [list(self.seq_pads[i]) for i in order]
        self.plan = None

    def _shrink(self, i: int, keep: int) -> None:
        self.blocks.crop(self.seq_blocks[i], keep)
        self.seq_lens[i] = keep

    def free(self, indices: list[int]) -> None:
        """Remove sequences from the batch and return their blocks. Raises ``IndexError`` (changing nothing) for an
        index outside ``0 .. batch_size - 1``."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        indices = [_int_arg("indices", i) for i in indices]
        self._check_indices(indices)
        drop = set(indices)
        self._reindex([i for i in range(self.batch_size) if i not in drop])

    # ------------------------------------------------------------------ memory accounting

    @property
    def layers_initialized(self) -> list[PagedLayer]:
        return [layer for layer in self.layers if layer.is_initialized]

    def bytes_per_block(self) -> int:
        total = 0
        for layer in self.layers_initialized:
            total += layer.k_pool[0].numel() * layer.k_pool.element_size()
            total += layer.v_pool[0].numel() * layer.v_pool.element_size()
        return total

    def memory_stats(self) -> dict:
        """Blocks used/free and bytes held; ``tokens`` counts every sequence's tokens, ``tokens_stored`` each
        shared block once; ``waste`` is the unused fraction of the held blocks (1 - tokens_stored / capacity)."""
        per_block = self.bytes_per_block()
        per_token = per_block / self.block_size
        fill: dict[int, int] = {}
        for blocks, n in zip(self.seq_blocks, self.seq_lens):
            for j, b in enumerate(blocks):
                fill[b] = max(fill.get(b, 0), min(self.block_size, n - j * self.block_size))
        stored = sum(fill.values())
        used = self.allocator.num_used
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": used,
            "blocks_free": self.allocator.num_free,
            "block_size": self.block_size,
            "sequences": self.batch_size,
            "tokens": sum(self.seq_lens),
            "tokens_stored": stored,
            "bytes_held": used * per_block,
            "bytes_tokens": int(stored * per_token),
            "bytes_pool": self.num_blocks * per_block,
            "waste": 0.0 if used == 0 else 1.0 - stored / (used * self.block_size),
        }

    # ------------------------------------------------------------------ step planning (used by the attention)

    def plan_step(self, q_len: int, q_mask: torch.Tensor | None, device: torch.device) -> StepPlan:
        """Reserve room for one forward step's new tokens; called by the first attention layer of the step.

        A step that fails (``CacheFullError``, a batch of the wrong size) leaves the cache exactly as it was.

        Args:
            q_len: padded number of new tokens per sequence.
            q_mask: bool ``(batch, q_len)``, which new tokens are real (``None``: all).
        """
        first = not self.seq_lens
        if not first:
            return self._plan(q_len, q_mask, device)
        # The first step fills an empty cache: on any failure, give back what it took and leave the cache empty.
        padded_len, group = self.padded_len, self.prompt_group_size
        try:
            if q_mask is None:
                raise RuntimeError("the first step into an empty PagedCache needs the batch size")
            batch = q_mask.shape[0]
            if group > 1:
                return self._plan_grouped(q_len, q_mask, device, group)
            self.seq_blocks, self.seq_lens, self.seq_pads = [[] for _ in range(batch)], [0] * batch, [[] for _ in range(batch)]
            return self._plan(q_len, q_mask, device)
        except BaseException:
            for blocks in self.seq_blocks:
                self.blocks.release(blocks)
            self.seq_blocks, self.seq_lens, self.seq_pads = [], [], []
            self.padded_len, self.prompt_group_size, self.plan = padded_len, group, None
            raise

    def _plan(self, q_len: int, q_mask: torch.Tensor | None, device: torch.device) -> StepPlan:
        """Plan a step for the cache's sequences; changes nothing unless it succeeds."""
        batch = self.batch_size
        if q_mask is None:
            n_new = [q_len] * batch
        else:
            if q_mask.shape[0] != batch:
                raise ValueError(f"PagedCache holds {batch} sequences but the step has {q_mask.shape[0]}")
            n_new = q_mask.sum(1).tolist()
        lens_before = list(self.seq_lens)
        seqs = list(zip(self.seq_blocks, lens_before))
        # atomic: raises CacheFullError before changing anything
        self.blocks.grow(seqs, n_new, detail=f"{batch} sequences, {sum(n_new)} new tokens")
        padded = [i for i, k in enumerate(n_new) if k < q_len]
        if padded:
            rows = (~q_mask[padded].bool()).to(device="cpu", dtype=torch.int8)
            edges = torch.diff(rows, dim=1, prepend=rows.new_zeros(len(padded), 1), append=rows.new_zeros(len(padded), 1))
            for r, i in enumerate(padded):
                starts = (edges[r] == 1).nonzero().view(-1).tolist()
                ends = (edges[r] == -1).nonzero().view(-1).tolist()
                self.seq_pads[i] = self.seq_pads[i] + [
                    (self.padded_len + a, self.padded_len + b) for a, b in zip(starts, ends)
                ]
        self.seq_lens = [n + k for n, k in zip(lens_before, n_new)]
        self.padded_len += q_len
        slots = [self.blocks.slots(blocks, n, n + k) for blocks, n, k in zip(self.seq_blocks, lens_before, n_new)]
        write_slots = torch.cat(slots).to(device) if slots else torch.empty(0, dtype=torch.long, device=device)
        q_idx = None
        if q_mask is not None and padded:
            q_idx = q_mask.reshape(-1).nonzero().view(-1)
        block_table, cache_seqlens = self._tables(device)
        self.plan = StepPlan(q_len, lens_before, n_new, q_idx, write_slots, block_table, cache_seqlens)
        return self.plan

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max([len(b) for b in self.seq_blocks] + [1])
        table = torch.zeros(self.batch_size, width, dtype=torch.int32)
        for i, blocks in enumerate(self.seq_blocks):
            if blocks:
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens = torch.tensor(self.seq_lens, dtype=torch.int32)
        return table.to(device), lens.to(device)

    def gather_index(self, plan: StepPlan, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Flat pool slots of every stored token, sequence after sequence, with cu_seqlens and max length."""
        if plan._gather is None:
            seqs = plan.seqs if plan.seqs is not None else list(zip(self.seq_blocks, self.seq_lens))
            slots = [self.blocks.slots(blocks, 0, n) for blocks, n in seqs]
            lens = torch.tensor([n for _, n in seqs], dtype=torch.int32)
            cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
            plan._gather = (torch.cat(slots).to(device), cu.to(device), max([n for _, n in seqs] + [0]))
        return plan._gather

    def _plan_grouped(self, q_len: int, q_mask: torch.Tensor, device, group: int) -> StepPlan:
        """First step of a batch made of groups of identical prompts: store each group's prompt once."""
        batch = q_mask.shape[0]
        if batch % group:
            raise ValueError(f"prompt_group_size={group} does not divide the batch size {batch}")
        grouped = q_mask.view(batch // group, group, q_len)
        if not bool((grouped == grouped[:, :1]).all()):
            raise ValueError(f"prompt_group_size={group}, but the prompts of a group have different padding")
        leaders = list(range(0, batch, group))
        lead_mask = q_mask[leaders]
        self.seq_blocks, self.seq_lens, self.seq_pads = [[] for _ in leaders], [0] * len(leaders), [[] for _ in leaders]
        lead_plan = self._plan(q_len, lead_mask, device)
        self.fork(group)
        n_new = [lead_plan.n_new[i // group] for i in range(batch)]
        # Rows (in the unpadded order of all real new tokens) that belong to leaders: the ones written.
        owner = torch.repeat_interleave(torch.arange(batch), torch.tensor(n_new))
        is_leader = (owner % group) == 0
        write_rows = is_leader.nonzero().view(-1).to(device)
        follower_rows = (~is_leader).nonzero().view(-1)
        leader_of = torch.cat([torch.arange(n) + sum(n_new[: i - i % group]) for i, n in enumerate(n_new)])
        check = (leader_of[follower_rows].to(device), follower_rows.to(device))
        q_idx = None if bool(q_mask.all()) else q_mask.reshape(-1).nonzero().view(-1)
        block_table, cache_seqlens = self._tables(device)
        self.plan = StepPlan(
            q_len, [0] * batch, n_new, q_idx, lead_plan.write_slots, block_table, cache_seqlens,
            write_rows=write_rows, group_check=check,
        )
        return self.plan


def _int_arg(name: str, value, optional: bool = False):
    """``value`` as a Python int (ints and integer-like objects such as numpy ints); a clear ``TypeError`` naming the
    argument otherwise (floats such as ``64.0`` included)."""
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool ({value})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
