import numpy as np
import pytest
import torch

from shardlens.hooks import Slice

X = torch.arange(2 * 7 * 3).reshape(2, 7, 3)


@pytest.mark.parametrize(
    "given, reference",
    [
        (None, X),
        (2, X[:, 2:3]),  # unwrap: an int keeps the axis
        (-1, X[:, 6:7]),
        ((3,), X[:, :3]),
        ((1, 5), X[:, 1:5]),
        ((0, 7, 2), X[:, 0:7:2]),
        (slice(2, None), X[:, 2:]),
        ([4, 0, 4], X[:, [4, 0, 4]]),
        (torch.tensor([1, 3]), X[:, [1, 3]]),
        (np.array([6, 5]), X[:, [6, 5]]),
        (torch.tensor([True, False, True, False, False, False, True]), X[:, [0, 2, 6]]),
    ],
)
def test_unwrap_applies_transformer_lens_semantics(given, reference):
    assert torch.equal(Slice.unwrap(given).apply(X, dim=1), reference)
    assert torch.equal(Slice.unwrap(given).apply(X, dim=-2), reference)


def test_a_bare_int_slice_drops_the_axis():
    assert torch.equal(Slice(2).apply(X, dim=1), X[:, 2])


def test_indices():
    assert Slice((1, 7, 3)).indices(7).tolist() == [1, 4]
    assert Slice(3).indices().tolist() == [3]
    assert Slice([5, 2]).indices().tolist() == [5, 2]
    with pytest.raises(ValueError, match="max_ctx"):
        Slice((1, 3)).indices()


@pytest.mark.parametrize("bad", ["3", 1.5, True, [[1, 2]], [0.5]])
def test_bad_inputs_are_refused_with_a_reason(bad):
    with pytest.raises(TypeError, match="pos_slice"):
        Slice.unwrap(bad)
