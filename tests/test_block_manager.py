"""The block manager (chapter 4) under random workloads: allocations, decoded tokens, frees, evictions."""

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mini_infer.memory.block_manager import BlockManager, hash_block

BLOCK_SIZE, NUM_BLOCKS = 4, 12


@dataclass
class Seq:
    token_ids: list
    block_table: list = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def test_prefix_is_shared():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = Seq(list(range(10)))  # blocks [0..3] [4..7] [8 9]
    assert bm.allocate(a) == 0
    b = Seq(list(range(8)) + [50, 51])
    assert bm.allocate(b) == 0  # A's blocks are not computed yet: nothing to share
    bm.free(b)
    bm.cache_computed(a, 10)
    b = Seq(list(range(8)) + [50, 51])
    assert bm.allocate(b) == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.pool.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    table_a = list(a.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    # a block-aligned prompt equal to a cached prefix: the block with the last token is computed again
    c = Seq(list(range(8)))
    assert bm.allocate(c) == 4 and c.block_table[0] == table_a[0] and c.block_table[1] != table_a[1]


def test_eviction_takes_empty_blocks_then_least_recently_freed():
    bm = BlockManager(num_blocks=5, block_size=4)
    x, y = Seq([1] * 4 + [2]), Seq([3] * 4 + [4])
    for seq in (x, y):
        bm.allocate(seq)
        bm.cache_computed(seq, 5)
    x_full, y_full = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)
    z = Seq([9] * 13)
    bm.allocate(z)  # four blocks: the never-used one, the two partial ones, then x's cached block
    assert x_full in z.block_table and y_full not in z.block_table
    assert bm.pool.blocks[x_full].hash is None and bm.pool.cached == {
        bm.pool.blocks[y_full].hash: y_full
    }
    bm.cache_computed(z, 13)
    bm.free(z)
    assert bm.allocate(Seq([3] * 4 + [5])) == 4


def test_no_prefix_caching():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = Seq(list(range(9))), Seq(list(range(9)))
    assert bm.allocate(a) == 0
    bm.cache_computed(a, 9)
    assert bm.allocate(b) == 0 and not bm.pool.cached
    assert not set(a.block_table) & set(b.block_table)


def test_refusals_change_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Seq(list(range(8)))
    bm.allocate(a)
    a.token_ids.append(8)
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError):
        bm.append_slot(a)
    assert a.block_table == [0, 1] and bm.num_free_blocks == 0
    b = Seq([7])
    assert not bm.can_allocate(b)
    with pytest.raises(RuntimeError):
        bm.allocate(b)
    assert b.block_table == [] and bm.num_free_blocks == 0
    with pytest.raises(ValueError):
        bm.allocate(a)


# Prompts are built from a few pieces (some a whole number of blocks long, some not) over a small
# alphabet, so that prefixes repeat, blocks get shared, and the small pool runs out and evicts.
PIECES = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [7] * 8, [5], [2, 2]]
prompts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map(
    lambda ps: [t for p in ps for t in p]
)


class BlockManagerMachine(RuleBasedStateMachine):
    """Runs sequences against the manager while simulating what each block holds: `content[b]` is the
    token prefix whose K/V block b contains (K/V depends on every token before it). Prompts are computed
    in chunks over several steps, as a scheduler with a token budget would."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.running: list[Seq] = []
        self.computed: dict[int, int] = {}  # id(seq) -> tokens whose K/V is in the pool
        self.content: dict[int, tuple] = {}

    def compute(self, seq, n):
        """The model computes K/V for the next n tokens of seq into its blocks, then the step ends."""
        done = self.computed[id(seq)]
        for p in range(done, done + n):
            block = seq.block_table[p // BLOCK_SIZE]
            assert self.bm.pool.blocks[block].ref_count == 1, "wrote into a shared block"
            if p % BLOCK_SIZE:
                assert self.content[block] == tuple(seq.token_ids[:p]), (
                    "block overwritten by someone else"
                )
            self.content[block] = tuple(seq.token_ids[: p + 1])
        self.computed[id(seq)] = done + n
        self.bm.cache_computed(seq, done + n)

    @rule(prompt=prompts, chunk=st.integers(1, 12))
    def add(self, prompt, chunk):
        seq, free = Seq(list(prompt)), self.bm.num_free_blocks
        said_yes = self.bm.can_allocate(seq)
        if free >= -(-len(prompt) // BLOCK_SIZE):
            assert said_yes, "refused although every block could be fresh"
        if not said_yes:
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq)
            assert seq.block_table == [] and self.bm.num_free_blocks == free
            return
        cached = self.bm.allocate(seq)
        assert cached == seq.num_cached_tokens and cached % BLOCK_SIZE == 0 and cached < len(prompt)
        for i in range(cached // BLOCK_SIZE):  # a cache hit holds exactly this prefix
            assert self.content[seq.block_table[i]] == tuple(prompt[: (i + 1) * BLOCK_SIZE])
        self.running.append(seq)
        self.computed[id(seq)] = cached
        self.compute(seq, min(chunk, len(prompt) - cached))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 7), chunk=st.integers(1, 12))
    def step(self, data, token, chunk):
        seq = data.draw(st.sampled_from(self.running))
        remaining = len(seq.token_ids) - self.computed[id(seq)]
        if remaining:  # the next chunk of its prompt
            self.compute(seq, min(chunk, remaining))
            return
        seq.token_ids.append(token)  # decode
        table, free = list(seq.block_table), self.bm.num_free_blocks
        if self.bm.can_append(seq):
            self.bm.append_slot(seq)
            self.compute(seq, 1)
        else:  # the scheduler would preempt: here, the sequence itself
            with pytest.raises(RuntimeError):
                self.bm.append_slot(seq)
            assert seq.block_table == table and self.bm.num_free_blocks == free == 0
            self.finish(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        self.finish(data.draw(st.sampled_from(self.running)))

    def finish(self, seq):
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_cached_tokens == 0
        self.running.remove(seq)
        del self.computed[id(seq)]

    @invariant()
    def ref_counts_match_owners(self):
        owners = [0] * NUM_BLOCKS
        for seq in self.running:
            assert len(set(seq.block_table)) == len(seq.block_table)
            assert len(seq.block_table) == -(-len(seq.token_ids) // BLOCK_SIZE)
            for b in seq.block_table:
                owners[b] += 1
        assert [blk.ref_count for blk in self.bm.pool.blocks] == owners
        assert set(self.bm.pool.free_ids) == {
            b for b in range(NUM_BLOCKS) if owners[b] == 0
        }  # free + used = total

    @invariant()
    def every_block_holds_its_owners_prefix(self):
        # so two sequences share a block only if their tokens agree up to its end
        for seq in self.running:
            done = self.computed[id(seq)]
            for i, b in enumerate(seq.block_table):
                if i * BLOCK_SIZE < done:
                    assert self.content[b] == tuple(
                        seq.token_ids[: min(done, (i + 1) * BLOCK_SIZE)]
                    )
                else:
                    assert self.bm.pool.blocks[b].ref_count == 1, (
                        "a block not computed yet is shared"
                    )

    @invariant()
    def cached_blocks_hold_what_their_hash_names(self):
        for h, b in self.bm.pool.cached.items():
            tokens = self.content[b]
            assert self.bm.pool.blocks[b].hash == h and len(tokens) % BLOCK_SIZE == 0
            name = b""
            for start in range(0, len(tokens), BLOCK_SIZE):
                name = hash_block(name, list(tokens[start : start + BLOCK_SIZE]))
            assert name == h

    def teardown(self):
        for seq in list(self.running):
            self.finish(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS  # freeing everything restores the whole pool
        assert all(blk.ref_count == 0 for blk in self.bm.pool.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
