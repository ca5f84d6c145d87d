"""The encoder engine's shapes: buckets chosen by length, every shape compiled at start-up."""

from __future__ import annotations

import numpy as np

from jaxserve.engine.embedding_engine import EmbedBuckets
from tests.engine.test_compilation import _Compiles


def test_buckets_and_plan():
    b = EmbedBuckets(max_len=256, max_num_seqs=8, max_tokens=512)
    assert b.lengths == [16, 32, 64, 128, 256]
    assert b.batch_sizes(16) == [1, 2, 4, 8] and b.batch_sizes(256) == [1, 2]
    assert EmbedBuckets(max_len=100, max_num_seqs=4, max_tokens=64).lengths == [16, 32, 64, 100]
    assert EmbedBuckets(max_len=100, max_num_seqs=4, max_tokens=64).batch_sizes(100) == [1]  # B = 1 always
    # Longest first; a batch holds one length bucket, as many as it allows, padded up to a batch bucket.
    lengths = [3, 200, 17, 40, 5, 9, 30, 250, 2, 1, 7]
    plan = b.plan(lengths)
    assert [len(take) for take, _ in b.plan([16] * 9)] == [8, 1]  # a bucket fuller than its largest batch
    assert [shape for _, shape in plan] == [(2, 256), (1, 64), (2, 32), (8, 16)]
    assert [lengths[i] for i in plan[0][0]] == [250, 200]
    assert sorted(i for take, _ in plan for i in take) == list(range(len(lengths)))
    for take, (batch, length) in plan:
        assert len(take) <= batch and all(b.length_for(lengths[i]) == length for i in take)
        assert (batch, length) in b.shapes


def test_serving_compiles_nothing(minilm_engine):
    rng = np.random.RandomState(0)
    seqs = [rng.randint(1000, 20000, size=n).tolist() for n in (1, 64, 17, 33, 2, 5, 63, 16, 9, 40, 3)]
    with _Compiles() as compiles:
        batched = minilm_engine.embed(seqs)
        alone = [minilm_engine.embed([s])[0] for s in seqs]
    assert compiles == []
    assert len(minilm_engine._compiled) == len(minilm_engine.buckets.shapes) == 8
    np.testing.assert_allclose(batched, np.stack(alone), atol=2e-6)  # padding never leaks into a row
