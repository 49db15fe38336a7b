"""The Merkle tree: published RFC 6962/9162 vectors, an independent reference, and proofs
that verify for every pair of sizes and fail for any flipped bit."""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import merkle
from eventstore.offline_verify import (
    EMPTY_ROOT,
    ProofError,
    leaf_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)

# Published in transparency-dev/merkle (proof/verify_test.go), from Certificate
# Transparency's RFC 6962 test data: leaf inputs, the roots of trees of size 1..8, and
# inclusion and consistency proofs.
LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f")
]  # fmt: skip
ROOTS = [
    bytes.fromhex(h)
    for h in (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
INCLUSION = [  # (leaf number from 1, tree size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [  # (size1, size2, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1's MTH, written out from the definition, recursively."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


def tiles_of(leaf_hashes: list[bytes]) -> merkle.Tiles:
    """The tiles :func:`merkle.extend` would store for these leaves (grown in chunks)."""
    tiles: merkle.Tiles = {}
    size = 0
    step = 97  # uneven rounds, as the worker's are
    for start in range(0, len(leaf_hashes), step):
        size = merkle._grow(tiles, size, leaf_hashes[start : start + step])
    return tiles


@cache
def generated(n: int) -> tuple[list[bytes], list[bytes], merkle.Tiles]:
    leaves = [f"event {i}".encode() for i in range(n)]
    hashes = [leaf_hash(x) for x in leaves]
    return leaves, hashes, tiles_of(hashes)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def test_roots_equal_the_published_vectors_and_the_reference():
    assert reference_root([]) == EMPTY_ROOT
    for size in range(1, 9):
        hashes = [leaf_hash(x) for x in LEAVES[:size]]
        accumulator = merkle.RootAccumulator()
        for h in hashes:
            accumulator.add(h)
        assert reference_root(LEAVES[:size]) == ROOTS[size - 1]
        assert accumulator.root() == ROOTS[size - 1]
        assert merkle.range_hash(tiles_of(hashes), 0, size) == ROOTS[size - 1]


def test_published_proofs_verify_and_ours_equal_them():
    hashes = [leaf_hash(x) for x in LEAVES]
    tiles = tiles_of(hashes)
    for leaf, size, proof in INCLUSION:
        expected = [bytes.fromhex(h) for h in proof]
        verify_inclusion(leaf - 1, size, hashes[leaf - 1], expected, ROOTS[size - 1])
        ours = [merkle.range_hash(tiles, a, b) for a, b in merkle.inclusion_ranges(leaf - 1, size)]
        assert ours == expected
    for size1, size2, proof in CONSISTENCY:
        expected = [bytes.fromhex(h) for h in proof]
        verify_consistency(size1, size2, ROOTS[size1 - 1], ROOTS[size2 - 1], expected)
        ours = [merkle.range_hash(tiles, a, b) for a, b in merkle.consistency_ranges(size1, size2)]
        assert ours == expected


def test_every_pair_of_sizes_proves_on_a_small_log():
    leaves, hashes, tiles = generated(40)
    roots = [reference_root(leaves[:n]) for n in range(41)]
    for n in range(1, 41):
        assert merkle.range_hash(tiles, 0, n) == roots[n]
        for m in range(n + 1):
            proof = [merkle.range_hash(tiles, a, b) for a, b in merkle.consistency_ranges(m, n)]
            verify_consistency(m, n, roots[m], roots[n], proof)
            if m < n:
                inclusion = [
                    merkle.range_hash(tiles, a, b) for a, b in merkle.inclusion_ranges(m, n)
                ]
                verify_inclusion(m, n, hashes[m], inclusion, roots[n])


sizes = st.integers(1, 1300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@settings(max_examples=150, deadline=None)
@given(pair=sizes, bit=st.integers(0, 10_000), index=st.integers(0, 10_000))
def test_proofs_verify_for_any_sizes_and_fail_for_any_flipped_bit(pair, bit, index):
    m, n = pair
    leaves, hashes, tiles = generated(1300)
    root_m, root_n = reference_root(leaves[:m]), reference_root(leaves[:n])
    assert merkle.range_hash(tiles, 0, n) == root_n
    proof = [merkle.range_hash(tiles, a, b) for a, b in merkle.consistency_ranges(m, n)]
    verify_consistency(m, n, root_m, root_n, proof)
    if proof:
        broken = list(proof)
        k = index % len(broken)
        broken[k] = flip(broken[k], bit)
        with pytest.raises(ProofError):
            verify_consistency(m, n, root_m, root_n, broken)
    if 0 < m < n:
        with pytest.raises(ProofError):
            verify_consistency(m, n, flip(root_m, bit), root_n, proof)
        with pytest.raises(ProofError):
            verify_consistency(m, n, root_m, flip(root_n, bit), proof)
    i = index % n
    inclusion = [merkle.range_hash(tiles, a, b) for a, b in merkle.inclusion_ranges(i, n)]
    verify_inclusion(i, n, hashes[i], inclusion, root_n)
    assert len(inclusion) <= n.bit_length()
    with pytest.raises(ProofError):
        verify_inclusion(i, n, flip(hashes[i], bit), inclusion, root_n)
    if inclusion:
        broken = list(inclusion)
        k = index % len(broken)
        broken[k] = flip(broken[k], bit)
        with pytest.raises(ProofError):
            verify_inclusion(i, n, hashes[i], broken, root_n)


def test_tiles_of_a_third_level_give_the_same_roots_and_proofs():
    # 2**16 leaves fill a level-1 tile: the first level-2 tile hash appears.
    n = (1 << 16) + 300
    hashes = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    tiles = tiles_of(hashes)
    assert (2, 0) in tiles
    accumulator = merkle.RootAccumulator()
    for size, h in enumerate(hashes, 1):
        accumulator.add(h)
        if size in (1 << 16, (1 << 16) + 1, n):
            root = accumulator.root()
            assert merkle.range_hash(tiles, 0, size) == root
            for i in (0, 255, 256, 65535, size - 1):
                path = [merkle.range_hash(tiles, a, b) for a, b in merkle.inclusion_ranges(i, size)]
                assert root_from_inclusion(i, size, hashes[i], path) == root


@given(
    st.integers(min_value=0, max_value=300),
    st.lists(st.integers(min_value=1, max_value=200), max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_accumulator_extended_in_runs_has_the_root_of_leaves_added_one_by_one(
    before: int, runs: list[int]
) -> None:
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(before + sum(runs))]
    one_by_one, in_runs = merkle.RootAccumulator(), merkle.RootAccumulator()
    for leaf in leaves:
        one_by_one.add(leaf)
    for leaf in leaves[:before]:
        in_runs.add(leaf)
    at = before
    for run in runs:
        in_runs.extend(leaves[at : at + run])
        at += run
    assert (in_runs.size, in_runs.root()) == (one_by_one.size, one_by_one.root())


@given(
    lengths=st.lists(st.one_of(st.none(), st.integers(0, 256)), min_size=1, max_size=5),
    first=st.integers(0, 1279),
    count=st.integers(0, 600),
)
def test_a_run_of_stored_leaves_keeps_every_leaf_at_its_offset(lengths, first, count):
    # Level-0 tiles of any length, some missing (None): each leaf of the run is the
    # stored one where its tile holds it, and 32 zero bytes (no SHA-256 output) where not.
    def leaf(i: int) -> bytes:
        return hashlib.sha256(i.to_bytes(4, "big")).digest()

    tiles = [
        (idx, b"".join(leaf(idx * 256 + j) for j in range(n)))
        for idx, n in enumerate(lengths)
        if n is not None
    ]
    low, high = merkle.level0_span(first, count)
    rows = [(idx, blob) for idx, blob in tiles if low <= idx <= high]
    run = merkle.leaf_run(rows, first, count)
    assert len(run) == 32 * count
    for k in range(count):
        i = first + k
        n = lengths[i >> 8] if (i >> 8) < len(lengths) else None
        held = n is not None and (i & 255) < n
        assert run[32 * k : 32 * k + 32] == (leaf(i) if held else bytes(32))
