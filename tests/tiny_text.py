"""A tiny text base (BPE tokenizer + random Llama) saved as a transformers directory, and data helpers.

Everything is built locally in well under a second; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.bases import resolve_base

CORPUS = [
    "Describe as JSON: Sam read under the round yard.",
    '{"who": "Sam", "did": "read", "where": "under the round yard"}',
    "The cat sat on the mat. The dog ran in the park. Anna sang near the old tree.",
    "Tom jumped over the red box. Lily walked to the blue house with Ben.",
    "hello world, this is a tiny corpus for a tiny tokenizer with a few words.",
    "<|user|> <|assistant|> <|system|> question answer yes no",
]

# The embedded tiny-llama's chat format, read from the shipped base so the two cannot drift apart.
CHAT_TEMPLATE = (Path(resolve_base("tiny-llama")) / "chat_template.jinja").read_text()


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_base(directory: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Saves a tiny random LlamaForCausalLM and its tokenizer into `directory` (usable as --base)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: str | Path, rows: list) -> Path:
    path = Path(path)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def task_rows(n: int, offset: int = 0) -> list[dict]:
    """prompt/completion rows of the JSON-description task, from a small grammar."""
    names = ["Sam", "Anna", "Tom", "Lily", "Ben"]
    verbs = ["read", "sat", "ran", "sang", "jumped"]
    places = ["in the park", "on the mat", "near the old tree", "under the round yard", "in the blue house"]
    rows = []
    for i in range(offset, offset + n):
        who, did, where = names[i % 5], verbs[(i // 5) % 5], places[(i // 25) % 5]
        rows.append(
            {
                "prompt": f"Describe as JSON: {who} {did} {where}.\n",
                "completion": json.dumps({"who": who, "did": did, "where": where}),
            }
        )
    return rows
