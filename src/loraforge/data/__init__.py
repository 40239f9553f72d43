"""Data loading for training: `text` (JSONL / plain text for causal LMs)."""
