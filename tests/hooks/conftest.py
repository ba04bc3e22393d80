import pytest
import torch

from shardlens.hooks.toy import ToyTransformer


@pytest.fixture
def model() -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(n_layers=2, d_model=16, n_heads=4, d_vocab=23)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(1))
