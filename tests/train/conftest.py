import pytest
from tiny_text import make_base, task_rows, write_jsonl


@pytest.fixture(scope="session")
def text_env(tmp_path_factory):
    """A tiny saved Llama base and small train / held-out files of the JSON-description task."""
    root = tmp_path_factory.mktemp("text_env")
    base = make_base(root / "base")
    train = write_jsonl(root / "train.jsonl", task_rows(40))
    heldout = write_jsonl(root / "heldout.jsonl", task_rows(8, offset=40))
    return {"root": root, "base": base, "train": train, "heldout": heldout}
