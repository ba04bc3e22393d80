"""Fixtures the tables tests share."""

import pytest
import torch


@pytest.fixture(scope="module")
def padded():
    """A left-padded batch of 3 examples (5, 8 and 2 real tokens) and its mask."""
    tokens = torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :6] = 0
    return tokens, mask
