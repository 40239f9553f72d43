"""Example datasets and task checkers that ship with loraforge."""
