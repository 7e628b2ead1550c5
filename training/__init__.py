"""The offline half: data preparation, training, evaluation and export to a serving bundle."""
