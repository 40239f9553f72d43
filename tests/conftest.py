"""Shared fixtures. Model builders live in tiny_models.py so any test folder can import them."""

import pytest
import torch
from tiny_models import tiny_llama


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (3, 7))
