"""Metrics against direct computation on logits."""

import pytest
import torch

import shardlens as sl


def test_metrics_score_the_last_real_position():
    logits = torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # example 0 ends at position 2
    answer, wrong = [3, 7], [1, 2]
    last = torch.stack([logits[0, 2], logits[1, 3]])
    diff = sl.metrics.logit_diff(answer, wrong)(logits, mask)
    assert torch.allclose(diff, (last[[0, 1], answer] - last[[0, 1], wrong]).mean())
    log_probs = last.log_softmax(-1)[[0, 1], answer]
    assert torch.allclose(sl.metrics.log_prob(answer)(logits, mask), log_probs.mean())
    assert torch.allclose(sl.metrics.prob(answer)(logits, mask), log_probs.exp().mean())
    tokens = torch.randint(0, 10, (2, 4))
    per_token = torch.nn.functional.cross_entropy(logits[1, :-1], tokens[1, 1:])
    assert torch.allclose(sl.metrics.loss().per_example(logits, mask, tokens)[1], per_token, atol=1e-6)


def test_metrics_round_trip_and_validate():
    from shardlens.hooks.codec import decode, encode

    metric = sl.metrics.logit_diff([1, 2], [3, 4])
    assert decode(encode(metric)) == metric
    assert metric.rows(slice(1, 2)).answer == (2,) and metric.repeat(2).wrong == (3, 4, 3, 4)
    with pytest.raises(ValueError, match="kind"):
        sl.metrics.Metric("accuracy")
    with pytest.raises(ValueError, match="one per example"):
        sl.metrics.prob("a")
    with pytest.raises(ValueError, match="3 token ids for a batch of 2"):
        sl.metrics.prob([1, 2, 3])(torch.zeros(2, 3, 5))
