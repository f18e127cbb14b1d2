"""Block manager bookkeeping, without a model."""

from __future__ import annotations

from ember.engine.block_manager import NULL_BLOCK, BlockManager, block_hashes

BS = 4


def _all_free(manager: BlockManager) -> bool:
    return manager.num_free_blocks == manager.num_blocks and all(b.ref_count == 0 for b in manager.blocks)


def test_allocate_and_free_return_every_block():
    manager = BlockManager(num_blocks=9, block_size=BS)
    assert manager.allocate("a", 10)  # 3 blocks
    assert manager.allocate("b", 16)  # 4 blocks
    assert manager.num_free_blocks == 1
    assert not manager.allocate("c", 5)  # needs 2
    assert "c" not in manager.tables
    manager.free("a")
    manager.free("b")
    assert _all_free(manager)


def test_growing_a_table_adds_only_missing_blocks():
    manager = BlockManager(num_blocks=9, block_size=BS)
    manager.allocate("a", 3)
    first = list(manager.block_ids("a"))
    manager.allocate("a", 4)
    assert manager.block_ids("a") == first
    manager.allocate("a", 5)
    assert manager.block_ids("a")[:1] == first and len(manager.block_ids("a")) == 2


def test_prefix_cache_hit_and_lru_eviction():
    manager = BlockManager(num_blocks=5, block_size=BS)
    tokens = list(range(10))
    hashes = block_hashes(tokens, BS)
    assert len(hashes) == 2
    manager.allocate("a", len(tokens))
    manager.cache_full_blocks("a", hashes, tokens)
    a_blocks = list(manager.block_ids("a"))
    manager.free("a")
    hit = manager.cached_prefix(hashes, tokens)
    assert hit == a_blocks[:2]
    # A different prefix with the same second block does not hit past the first difference.
    other = [99] + tokens[1:]
    assert manager.cached_prefix(block_hashes(other, BS), other) == []
    assert manager.allocate("b", len(tokens), computed=hit)
    assert manager.block_ids("b")[:2] == a_blocks[:2]
    manager.free("b")
    # Filling the pool with new blocks evicts the cached ones.
    assert manager.allocate("c", 16)
    assert manager.cached_prefix(hashes, tokens) == []
    manager.free("c")
    assert _all_free(manager)


def test_hash_chain_depends_on_the_whole_prefix():
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)[1] != block_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS)[1]


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    manager = BlockManager(num_blocks=9, block_size=BS)
    manager.allocate("p", 6)
    parent = manager.block_ids("p")
    copy = manager.fork("p", "c", num_tokens=6)
    child = manager.block_ids("c")
    assert child[0] == parent[0] and manager.blocks[parent[0]].ref_count == 2
    assert copy == (parent[1], child[1]) and child[1] != parent[1]
    assert manager.fork("p", "d", num_tokens=8) is None  # at a block boundary nothing is copied
    for request in ("p", "c", "d"):
        manager.free(request)
    assert _all_free(manager)


def test_sliding_window_releases_blocks_out_of_window():
    manager = BlockManager(num_blocks=9, block_size=BS, window=6)
    assert manager.allocate("a", 20, first_needed=20 - 6)  # positions 14..19 -> blocks 3, 4
    table = manager.block_ids("a")
    assert table[:3] == [NULL_BLOCK] * 3 and all(b != NULL_BLOCK for b in table[3:])
    assert manager.num_free_blocks == manager.num_blocks - 2
    assert manager.allocate("a", 24, first_needed=24 - 6)  # block 4, 5 needed
    assert manager.block_ids("a")[3] == NULL_BLOCK
    manager.free("a")
    assert _all_free(manager)
