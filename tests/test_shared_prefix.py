"""Endings scored after a shared prefix, each item packed into one row
(gpt2np.evals.shared_prefix), against the rows prefix + ending scored one by one."""
from __future__ import annotations

import numpy as np
import pytest

from gpt2np import GPT, GPTConfig
from gpt2np.evals import hellaswag as H
from gpt2np.evals.shared_prefix import continuation_losses

CFG = GPTConfig(block_size=40, vocab_size=97, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def model64():
    return GPT(CFG, dtype="float64", seed=11)


def _items(rng, n, k, prefix=(1, 16), ending=(1, 7)):
    prefixes = [rng.integers(0, CFG.vocab_size, int(rng.integers(*prefix))) for _ in range(n)]
    endings = [[rng.integers(0, CFG.vocab_size, int(rng.integers(*ending))) for _ in range(k)]
               for _ in range(n)]
    return prefixes, endings


def _row_losses(model, prefix, ending):
    # the row prefix + ending on its own: the summed loss of the ending's tokens
    row = np.concatenate([prefix, ending])
    targets = np.full((1, len(row)), -1)
    targets[0, len(prefix) - 1:-1] = ending  # the logits at j-1 predict the token at j
    return model.token_losses(row[None], targets).sum()


@pytest.mark.parametrize("k", [1, 4])
def test_packed_items_score_as_their_rows(model64, k):
    """Prefixes of 1 to 15 tokens and endings of 1 to 6 in one forward, padded: each
    ending's loss is that of its own row to float64 rounding, its count its length."""
    rng = np.random.default_rng(k)
    prefixes, endings = _items(rng, 7, k)
    sums, counts = continuation_losses(model64, prefixes, endings)
    assert sums.shape == counts.shape == (7, k) and sums.dtype == np.float64
    for i in range(7):
        for j in range(k):
            want = _row_losses(model64, prefixes[i], endings[i][j])
            assert sums[i, j] == pytest.approx(want, rel=1e-12)
            assert counts[i, j] == len(endings[i][j])


def test_float32_packed_items_score_as_their_float64_rows(model64):
    m32 = GPT(CFG, dtype="float32", params=model64.state_dict())
    rng = np.random.default_rng(5)
    prefixes, endings = _items(rng, 5, 3)
    s32, _ = continuation_losses(m32, prefixes, endings)
    s64, _ = continuation_losses(model64, prefixes, endings)
    np.testing.assert_allclose(s32, s64, rtol=1e-4)  # as HellaSwag's float32 twin test


def test_an_ending_sees_neither_the_other_endings_nor_the_padding(model64):
    """Changing one ending (and with it the row's length, so the padding) leaves the losses
    of the other endings and of the other items as they were."""
    rng = np.random.default_rng(6)
    prefixes, endings = _items(rng, 3, 3, ending=(2, 7))
    before, _ = continuation_losses(model64, prefixes, endings)
    endings[1][0] = rng.integers(0, CFG.vocab_size, 9)
    after, counts = continuation_losses(model64, prefixes, endings)
    assert counts[1, 0] == 9
    changed = np.zeros(before.shape, dtype=bool)
    changed[1, 0] = True
    np.testing.assert_allclose(after[~changed], before[~changed], rtol=1e-13)
    assert after[1, 0] != before[1, 0]


def test_only_the_items_tokens_run_through_the_layers_but_attention(model64, monkeypatch):
    """The items run end to end (no padding) through every layer but attention, which gets
    them in rows padded to the longest: the linears see sum(widths) rows, not n * width."""
    import dataclasses

    rng = np.random.default_rng(8)
    prefixes, endings = _items(rng, 4, 3, ending=(2, 7))
    widths = [len(p) + sum(len(e) - 1 for e in ends) for p, ends in zip(prefixes, endings)]
    seen, shapes = [], []
    ops = model64.ops

    def linear_forward(x, w, b):
        seen.append(x.shape[:-1])
        return ops.linear_forward(x, w, b)

    def masked_attention_forward(qkv, n_head, mask, bias=None):
        shapes.append(qkv.shape[:2])
        return ops.masked_attention_forward(qkv, n_head, mask, bias)

    want, _ = continuation_losses(model64, prefixes, endings)
    monkeypatch.setattr(model64, "ops", dataclasses.replace(
        ops, linear_forward=linear_forward, masked_attention_forward=masked_attention_forward))
    got, _ = continuation_losses(model64, prefixes, endings)
    np.testing.assert_array_equal(got, want)
    assert set(seen) == {(1, sum(widths))} and len(seen) == 4 * CFG.n_layer
    assert set(shapes) == {(4, max(widths))} and len(shapes) == CFG.n_layer


def test_bad_items_are_refused(model64):
    rng = np.random.default_rng(7)
    p, e = _items(rng, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        continuation_losses(model64, [p[0], p[1][:0]], e)
    with pytest.raises(ValueError, match="empty"):
        continuation_losses(model64, p, [e[0], [e[1][0], e[1][1][:0]]])
    with pytest.raises(ValueError, match="same number"):
        continuation_losses(model64, p, [e[0], e[1][:1]])
    with pytest.raises(ValueError, match="vocab_size=97"):
        continuation_losses(model64, [p[0], np.array([97])], e)
    with pytest.raises(ValueError, match="vocab_size=97"):
        continuation_losses(model64, p, [e[0], [e[1][0], np.array([-1])]])
    with pytest.raises(ValueError, match="block size 40"):
        continuation_losses(model64, [np.zeros(35, int), p[1]], [[np.zeros(6, int)] * 2, e[1]])


def test_hellaswag_scores_shared_contexts_packed_and_the_others_by_rows(model64):
    """ending_losses with a model's shared_function: the items whose rows share a context go
    packed, the others (rows that differ from the start) by rows; the same sums as rows
    alone, and every batch within the token budget."""
    rng = np.random.default_rng(8)
    items = []
    for i in range(9):
        ctx = rng.integers(0, 97, int(rng.integers(1, 12)))
        rows = [np.concatenate([ctx, rng.integers(0, 97, int(rng.integers(1, 9)))])
                for _ in range(4)]
        if i % 3 == 0:  # no common context: a row's own first token starts each
            rows = [rng.integers(0, 97, len(r)) for r in rows]
            items.append(H.Rendered(rows, [1] * 4, 0, True))
        else:
            items.append(H.Rendered(rows, [len(ctx)] * 4, 0, False))
    assert [H.shared_context(r) is None for r in items] == [i % 3 == 0 for i in range(9)]
    score = H.losses_function(model64)
    by_rows, n_rows = H.ending_losses(None, items, 4096, score=score)
    calls = []
    shared = H.shared_function(model64)

    def counting(prefixes, endings):
        calls.append(len(prefixes) * max(len(p) + sum(len(e) - 1 for e in ends)
                                         for p, ends in zip(prefixes, endings)))
        return shared(prefixes, endings)

    for budget in (4096, 40):
        calls.clear()
        got, n_got = H.ending_losses(None, items, budget, score=score, shared=counting)
        np.testing.assert_allclose(got, by_rows, rtol=1e-12)
        assert (n_got == n_rows).all()
        assert sum(calls) and all(c <= budget for c in calls)
    assert len(calls) > 1  # the small budget split the packed items
