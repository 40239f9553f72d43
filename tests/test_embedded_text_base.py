"""The embedded tiny-llama copies from its prompt: what lets the example fine-tune answer with the
sentence's own words. Word lists and sentences it never saw in pretraining, greedy decoding."""

import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.bases import resolve_base
from loraforge.train.text import EXAMPLE_HELDOUT

WORDS = "red bridge kitten whispered lamp under tiny garden Oscar silver crawled meadow pilot round".split()


def greedy(model, tokenizer, prompt: str, n: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_embedded_base_repeats_new_word_lists_and_extracts_parts_of_held_out_sentences():
    path = resolve_base("tiny-llama")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    rng = random.Random(3)
    lists = [" ".join(rng.sample(WORDS, 7)) for _ in range(10)]
    repeated = [greedy(model, tokenizer, f"Words: {w}. Again:", 12).startswith(f" {w}.") for w in lists]
    assert sum(repeated) >= 8, repeated

    rows = [json.loads(line) for line in EXAMPLE_HELDOUT.read_text().splitlines()[:20]]
    right = 0
    for row in rows:
        sentence = row["prompt"].split(": ", 1)[1].strip()
        want = json.loads(row["completion"])
        got = greedy(
            model,
            tokenizer,
            f"Read this: {sentence}\nwho = {want['who'][0].upper() + want['who'][1:]}\nwhere =",
            12,
        )
        right += got.split("\n")[0].strip() == want["where"]
    assert right >= 16, right  # the multi-word `where` phrase, copied out of a sentence it never saw
