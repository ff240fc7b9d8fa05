"""The names in bingo's registries, importable without torch: the command line's choices.

``bingo --help`` and argument errors must come at once, and importing torch takes seconds, so
the ``bingo`` command's flags take their choices from here, not from the registries themselves
(which live in modules that import torch). tests/test_cli.py holds each tuple equal to its
registry, so the two cannot drift apart.
"""

GRANULARITIES = ("weight", "neuron", "structured")
"""bingo.units.GRANULARITIES."""
SCORES = ("seed", "attribution")
"""The keys of bingo.estimators.ESTIMATORS."""
METRICS = ("accuracy", "loss")
"""bingo.estimators.METRICS."""
RESETS = ("init", "zero", "rewind")
"""bingo.search.RESETS."""
DATASETS = ("digits", "mnist")
"""The keys of bingo.data.DATASETS."""
MODELS = ("lenet_300_100", "lenet5")
"""The keys of bingo.models.MODELS."""
ATTENTIONS = ("linear", "mha")
"""The keys of bingo.gpt_pipeline.ATTENTIONS (``bingo gpt --attention``)."""
