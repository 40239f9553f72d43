"""Inference commands: `text` (`loraforge generate`)."""
