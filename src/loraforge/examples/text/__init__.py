"""The example text fine-tune: teach the embedded `tiny-llama` base to describe a sentence as JSON.

`train.jsonl` / `heldout.jsonl` hold `prompt` / `completion` rows made by `scripts/make_text_data.py`;
`task.follows_task` decides whether a generation follows the taught format.
"""
