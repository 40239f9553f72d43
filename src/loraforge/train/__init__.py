"""Training: the shared loop (`loop.train`), configuration (`config`), checkpoints (`checkpoint`) and
the commands built on them (`text` for `loraforge train`, `image` for `loraforge train-image`)."""
