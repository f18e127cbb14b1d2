"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables, reference counts, a free
queue in LRU order, and automatic prefix caching over a hash chain of full blocks.

No tensors live here; the model runner owns the pools and only sees block ids. One BlockManager serves
one group of layers. A sliding-window group (`window` set) drops blocks that fell out of every layer's
window, so a long context costs memory mainly in the full-attention layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK = 0  # block 0 is never handed out: it stands in for blocks freed out of the window


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # what the hash covers, checked on every hit (no silent collisions)
    parent_hash: int | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Hash chain over the full blocks of `token_ids`: each block's hash covers all tokens before it."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


@dataclass
class BlockTable:
    """One request's blocks in one group; entry i holds positions [i*block_size, (i+1)*block_size)."""

    block_ids: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int | None = None
    ) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently used first; cached ones stay findable until handed out again.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.tables: dict[str, BlockTable] = {}
        self.stats = PrefixCacheStats()

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) - 1  # without the null block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- per request ------------------------------------------------------------------------------

    def block_ids(self, request_id: str) -> list[int]:
        return self.tables[request_id].block_ids

    def lookup(self, hashes: Sequence[int], token_ids: Sequence[int]) -> list[int | None]:
        """For each full block of the prompt, the id of a cached block with the same content, or None."""
        if not self.enable_prefix_caching:
            return [None] * len(hashes)
        found: list[int | None] = []
        for i, block_hash in enumerate(hashes):
            block_id = self.cached.get(block_hash)
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            found.append(block_id if block_id is not None and self.blocks[block_id].token_ids == tokens else None)
        return found

    def cached_prefix(self, hashes: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest run of leading full blocks found in the cache."""
        found = self.lookup(hashes, token_ids)
        length = found.index(None) if None in found else len(found)
        return [b for b in found[:length] if b is not None]

    def can_allocate(self, request_id: str, num_tokens: int, computed: Sequence[int] = (), first_needed: int = 0) -> bool:
        return self._blocks_to_take(request_id, num_tokens, computed, first_needed) <= self.num_free_blocks

    def _blocks_to_take(self, request_id: str, num_tokens: int, computed: Sequence[int], first_needed: int) -> int:
        """Free-queue blocks `allocate` would consume (new blocks plus cache hits that are free now)."""
        table = self.tables.get(request_id)
        held = len(table.block_ids) if table else 0
        first_block = first_needed // self.block_size if self.window is not None else 0
        start = held + len(computed)
        new = sum(1 for i in range(start, -(-num_tokens // self.block_size)) if i >= first_block)
        reused = sum(1 for b in computed if b != NULL_BLOCK and self.blocks[b].ref_count == 0)
        released = 0
        if table and self.window is not None:  # blocks this call drops out of the window come back first
            dropped = table.block_ids[: min(first_block, held)]
            released = sum(1 for b in dropped if b != NULL_BLOCK and self.blocks[b].ref_count == 1)
        return new + reused - released

    def allocate(self, request_id: str, num_tokens: int, computed: Sequence[int] = (), first_needed: int = 0) -> bool:
        """Make the request's table cover `num_tokens` positions, claiming `computed` (cache hits) first.

        `first_needed` is the first position any layer of this group still attends to; in a sliding
        group, blocks wholly before it are released or never allocated. Returns False, changing
        nothing, when blocks run out.
        """
        if not self.can_allocate(request_id, num_tokens, computed, first_needed):
            return False
        table = self.tables.setdefault(request_id, BlockTable())
        self._drop_out_of_window(table, first_needed)
        first_block = first_needed // self.block_size if self.window is not None else 0
        start = len(table.block_ids) + len(computed)
        for block_id in computed:
            self._claim(block_id)
            table.block_ids.append(block_id)
        table.num_cached_blocks = max(table.num_cached_blocks, len(computed))
        for i in range(start, -(-num_tokens // self.block_size)):
            table.block_ids.append(self._take_free() if i >= first_block else NULL_BLOCK)
        self._drop_out_of_window(table, first_needed)
        return True

    def cache_full_blocks(self, request_id: str, hashes: Sequence[int], token_ids: Sequence[int]) -> None:
        """Register the request's newly filled blocks (given the hash chain of its computed tokens)."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[request_id]
        for i in range(table.num_cached_blocks, min(len(hashes), len(table.block_ids))):
            block = self.blocks[table.block_ids[i]]
            if block.block_id == NULL_BLOCK or block.block_hash is not None:
                continue
            if hashes[i] in self.cached:
                continue  # an identical block exists already; keep one copy findable
            block.block_hash = hashes[i]
            block.token_ids = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self.cached[hashes[i]] = block.block_id
        table.num_cached_blocks = max(table.num_cached_blocks, min(len(hashes), len(table.block_ids)))

    def free(self, request_id: str) -> None:
        """Release a request's blocks. Tail blocks go to the free queue first so they are evicted before
        the prefix blocks other requests are more likely to share."""
        table = self.tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.block_ids):
            self._release(block_id)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Release the trailing blocks that hold no position below `num_tokens` (rejected drafts' slots)."""
        table = self.tables.get(request_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        while len(table.block_ids) > keep:
            self._release(table.block_ids.pop())
        table.num_cached_blocks = min(table.num_cached_blocks, keep)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> tuple[int, int] | None:
        """Share the parent's blocks with a child. A partly filled last block is copied (copy-on-write):
        returns (source, destination) for the runner to copy, or None. Raises if no block is free."""
        parent = self.tables[parent_id]
        # Only the blocks holding the first `num_tokens` positions: the parent's table may reach further
        # (slots allocated ahead for a draft model), and the child must not share those.
        keep = -(-num_tokens // self.block_size)
        child = BlockTable(parent.block_ids[:keep], min(parent.num_cached_blocks, keep))
        copy = None
        if num_tokens % self.block_size and child.block_ids:
            if not self.free_queue:
                raise MemoryError("no free KV block to fork into")
            source = child.block_ids[-1]
            child.block_ids[-1] = self._take_free()
            copy = (source, child.block_ids[-1])
        for block_id in child.block_ids:
            if copy is None or block_id != copy[1]:
                self._claim(block_id)
        self.tables[child_id] = child
        return copy

    # -- internals --------------------------------------------------------------------------------

    def _claim(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block_id == NULL_BLOCK:
            return
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        if block_id == NULL_BLOCK:
            return
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)  # least recently used
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _drop_out_of_window(self, table: BlockTable, first_needed: int) -> None:
        if self.window is None:
            return
        for i in range(min(first_needed // self.block_size, len(table.block_ids))):
            if table.block_ids[i] != NULL_BLOCK:
                self._release(table.block_ids[i])
                table.block_ids[i] = NULL_BLOCK


class KVCacheManager:
    """The block managers of every layer group, driven together for each request.

    Groups share the hash chain (it depends only on tokens), so a prefix hit is the longest prefix that
    every full-attention group has cached and whose last window every sliding group still has.
    """

    def __init__(self, groups: Sequence[tuple[int, int | None]], block_size: int, enable_prefix_caching: bool = True):
        """groups: (num_blocks, window) per layer group, in the KV cache's group order."""
        self.block_size = block_size
        self.managers = [BlockManager(n, block_size, enable_prefix_caching, window) for n, window in groups]
        self.stats = PrefixCacheStats()

    @property
    def capacity_tokens(self) -> int:
        """Most tokens one sequence can hold (full-attention groups limit it; sliding ones only bound a window)."""
        full = [m.num_blocks for m in self.managers if m.window is None]
        return (min(full) if full else max(m.num_blocks for m in self.managers)) * self.block_size

    @property
    def usage(self) -> float:
        return max(m.usage for m in self.managers)

    @property
    def num_free_blocks(self) -> int:
        return sum(m.num_free_blocks for m in self.managers)

    @property
    def num_total_blocks(self) -> int:
        return sum(m.num_blocks for m in self.managers)

    def can_ever_fit(self, num_tokens: int, chunk: int) -> bool:
        """Whether an otherwise empty cache could hold a sequence of `num_tokens` computed in `chunk`s."""
        for m in self.managers:
            if m.window is None:
                blocks = -(-num_tokens // self.block_size)
            else:  # a chunk's queries see `window - 1` older keys; +1 block as they straddle boundaries
                blocks = -(-min(num_tokens, m.window - 1 + chunk) // self.block_size) + 1
            if blocks > m.num_blocks:
                return False
        return True

    def block_tables(self, request_id: str) -> list[list[int]]:
        return [m.block_ids(request_id) for m in self.managers]

    def computed_blocks(self, hashes: Sequence[int], token_ids: Sequence[int]) -> tuple[list[list[int]], int]:
        """Cache hits for a new request: block ids per group and the number of tokens they cover.

        A full-attention group needs every block of the prefix; a sliding group only the blocks of the
        window before the first position to compute. At least one token is always left to compute, so
        the step has a position to sample from."""
        usable = hashes[: (len(token_ids) - 1) // self.block_size]
        found = [m.lookup(usable, token_ids) for m in self.managers]
        length = len(usable)
        for m, f in zip(self.managers, found):
            if m.window is None and None in f:
                length = min(length, f.index(None))
        while length > 0 and not all(
            None not in f[self._first_needed_block(m, length) : length] for m, f in zip(self.managers, found)
        ):
            length -= 1
        computed = []
        for m, f in zip(self.managers, found):
            first = self._first_needed_block(m, length)
            computed.append([NULL_BLOCK] * first + [b for b in f[first:length] if b is not None])
        return computed, length * self.block_size

    def record_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count an admitted request's prompt lookup (hits and queries in tokens, for metrics)."""
        self.stats.queries += num_tokens
        self.stats.hits += num_cached

    def allocate(
        self, request_id: str, num_computed: int, num_new: int, computed: Sequence[Sequence[int]] | None = None
    ) -> bool:
        """Blocks for positions up to num_computed + num_new in every group, or False with nothing changed."""
        computed = computed or [()] * len(self.managers)
        total = num_computed + num_new
        plans = [
            (m, c, max(0, num_computed - m.window + 1) if m.window else 0) for m, c in zip(self.managers, computed)
        ]
        if any(not m.can_allocate(request_id, total, c, first) for m, c, first in plans):
            return False
        for m, c, first in plans:
            allocated = m.allocate(request_id, total, c, first)
            assert allocated
        return True

    def cache_full_blocks(self, request_id: str, hashes: Sequence[int], token_ids: Sequence[int]) -> None:
        for m in self.managers:
            m.cache_full_blocks(request_id, hashes, token_ids)

    def free(self, request_id: str) -> None:
        for m in self.managers:
            m.free(request_id)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        for m in self.managers:
            m.truncate(request_id, num_tokens)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int, int]] | None:
        """Share the parent's blocks with the child; returns the (group, source, destination) copies to
        make, or None (nothing changed) when there are not enough free blocks for them."""
        partial = num_tokens % self.block_size != 0
        if partial and any(m.num_free_blocks < 1 for m in self.managers):
            return None
        copies = []
        for group, m in enumerate(self.managers):
            copy = m.fork(parent_id, child_id, num_tokens)
            if copy is not None:
                copies.append((group, *copy))
        return copies

    def _first_needed_block(self, manager: BlockManager, length: int) -> int:
        if manager.window is None:
            return 0
        return max(0, length * self.block_size - manager.window + 1) // self.block_size
