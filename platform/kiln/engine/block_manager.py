"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables and a free list.

As in vLLM's PagedAttention (Kwon et al., arXiv 2309.06180), the KV cache is one pool of
`num_blocks` blocks of `block_size` token slots. A request owns a block table (the physical
blocks holding its tokens in order); token i lives in block `table[i // block_size]` at offset
`i % block_size`. Memory is committed one block at a time, so fragmentation is at most one
partly filled block per request, and freeing a request returns whole blocks to the free list.

This class only counts slots; the tensors live in the model runner. The engine keeps the
number of slots a request holds equal to its number of computed tokens between steps: the
scheduler grows it for the step's tokens (plus speculative lookahead) and the engine rolls it
back for tokens whose KV is not kept (rejected drafts, unused lookahead).
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.num_slots: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, request_id: str, num_new_slots: int) -> int:
        """Extra blocks `allocate(request_id, num_new_slots)` would take from the free list."""
        held = self.num_slots.get(request_id, 0)
        have = len(self.tables.get(request_id, ()))
        return max(0, -(-(held + num_new_slots) // self.block_size) - have)

    def can_allocate(self, request_id: str, num_new_slots: int) -> bool:
        return self.blocks_needed(request_id, num_new_slots) <= self.num_free_blocks

    def allocate(self, request_id: str, num_new_slots: int) -> bool:
        """Grow (or create) a request's reservation by `num_new_slots` token slots.

        All or nothing: returns False and changes nothing when the free list is too short.
        """
        needed = self.blocks_needed(request_id, num_new_slots)
        if needed > self.num_free_blocks:
            return False
        table = self.tables.setdefault(request_id, [])
        table.extend(self.free_blocks.popleft() for _ in range(needed))
        self.num_slots[request_id] = self.num_slots.get(request_id, 0) + num_new_slots
        return True

    def rollback(self, request_id: str, num_slots: int) -> None:
        """Give back the last `num_slots` slots (rejected drafts); emptied blocks are freed."""
        held = self.num_slots[request_id]
        if not 0 <= num_slots <= held:
            raise ValueError(f"cannot roll back {num_slots} of {held} slots of {request_id!r}")
        self.num_slots[request_id] = held - num_slots
        table = self.tables[request_id]
        keep = -(-(held - num_slots) // self.block_size)
        # Freed blocks go to the front: they are the most recently touched (warm in cache).
        self.free_blocks.extendleft(reversed(table[keep:]))
        del table[keep:]

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks (no-op for a request holding none)."""
        self.free_blocks.extend(self.tables.pop(request_id, ()))
        self.num_slots.pop(request_id, None)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def check_invariants(self) -> None:
        """Raise AssertionError on a leak or double free: every block is free xor owned once."""
        owned = [b for table in self.tables.values() for b in table]
        everything = owned + list(self.free_blocks)
        assert len(everything) == len(set(everything)), "a block is free and owned, or owned twice"
        assert sorted(everything) == list(range(self.num_blocks)), "a block leaked"
        for rid, table in self.tables.items():
            slots = self.num_slots[rid]
            assert len(table) == -(-slots // self.block_size), f"{rid}: table/slot mismatch"
