"""Evaluation measures that ship with loraforge."""

from loraforge.eval.style import style_components, style_score

__all__ = ["style_components", "style_score"]
