"""bingo: BINGO pruning (ticket search during training, significance, one-shot pruning)."""

__version__ = "0.1.0"
