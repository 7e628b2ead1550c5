"""Offline half: data preparation, training, evaluation (and later export)."""
