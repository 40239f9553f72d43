import pytest
from tiny_text import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
