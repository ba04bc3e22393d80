import pytest
import torch

import shardlens as sl

from shardlens.hooks.toy import ToyTransformer


@pytest.fixture
def model() -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(n_layers=2, d_model=16, n_heads=4, d_vocab=23)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoints):
    """The tiny GPT-2 checkpoint as a HookedModel (one per test module)."""
    return sl.HookedModel.from_pretrained(tiny_checkpoints["gpt2"])
