"""``pack_sequences`` (batched numpy) against a per-token loop written from its definition."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import pack_sequences


def _per_token(q_lens, seq_lens, tables, page, *, num_tokens, num_seqs, table_width):
    """Each new token ``j`` of sequence ``b`` sits at position ``seq_len - q_len + j``, in slot
    ``table[pos // page] * page + pos % page``; the table holds the pages the sequence uses."""
    slots = np.zeros(num_tokens, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    sl = np.zeros(num_seqs, np.int32)
    bt = np.zeros((num_seqs, table_width), np.int32)
    positions = np.zeros(num_tokens, np.int32)
    t = 0
    for b, (q, s, pages) in enumerate(zip(q_lens, seq_lens, tables, strict=True)):
        used = -(-s // page)
        bt[b, :used] = pages[:used]
        sl[b] = s
        for pos in range(s - q, s):
            slots[t] = pages[pos // page] * page + pos % page
            positions[t] = pos
            t += 1
        qsl[b + 1] = t
    qsl[len(q_lens) + 1 :] = t
    return slots, qsl, sl, bt, positions


@pytest.mark.parametrize("seed", range(6))
def test_matches_per_token_loop(seed):
    rng = np.random.default_rng(seed)
    page, width, num_seqs = 4, 6, 8
    n = int(rng.integers(1, num_seqs + 1))
    seq_lens = [int(x) for x in rng.integers(0, page * width + 1, n)]
    # decode rows, whole prompts, chunks, zero-query rows (also a sequence of length 0)
    q_lens = [int(rng.integers(0, s + 1)) if s else 0 for s in seq_lens]
    # spare pages beyond those used must not reach the table
    tables = [[int(p) for p in rng.permutation(100)[: -(-s // page) + int(rng.integers(0, 3))] + 1] for s in seq_lens]
    kw = {"num_tokens": sum(q_lens) + int(rng.integers(0, 5)), "num_seqs": num_seqs, "table_width": width}
    got = pack_sequences(q_lens, seq_lens, tables, page, **kw)
    want = _per_token(q_lens, seq_lens, tables, page, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == np.int32
        np.testing.assert_array_equal(g, w)


def test_reference_loop_sees_a_wrong_slot():
    """The oracle is not vacuous: a table of other pages gives other slots."""
    kw = {"num_tokens": 4, "num_seqs": 2, "table_width": 2}
    got = pack_sequences([1, 3], [5, 3], [[7, 8], [9]], 4, **kw)
    assert not np.array_equal(got[0], _per_token([1, 3], [5, 3], [[7, 2], [9]], 4, **kw)[0])
    np.testing.assert_array_equal(got[0], [8 * 4 + 0, 9 * 4, 9 * 4 + 1, 9 * 4 + 2])


@pytest.mark.parametrize("q_lens, seq_lens, tables, match", [
    ([3], [2], [[1]], "exceeds seq_len"),
    ([1], [9], [[1, 2]], "need 3 pages"),
    ([1, 1], [1, 1], [[1]], "one entry per sequence"),
    ([4, 4], [4, 4], [[1], [2]], "do not fit num_tokens"),
])
def test_rejects(q_lens, seq_lens, tables, match):
    with pytest.raises(ValueError, match=match):
        pack_sequences(q_lens, seq_lens, tables, 4, num_tokens=6, num_seqs=2, table_width=4)
