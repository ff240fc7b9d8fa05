"""Training-framework integrations: optional extras, imported only on demand.

* :mod:`bingo.integrations.lightning` — ``TicketSearchCallback`` for PyTorch Lightning
  (``pip install "bingo-prune[lightning]"``).
* :mod:`bingo.integrations.huggingface` — ``TicketSearchCallback`` for the Hugging Face
  ``Trainer`` (``pip install "bingo-prune[hf]"``).

Importing :mod:`bingo` (or this package) never imports lightning or transformers; importing one
of the modules above without its extra raises :class:`MissingExtraError` naming the install
command. The plain training loop with :meth:`bingo.TicketSearch.step` stays the primary path;
the callbacks only call it for you and keep its state in the framework's checkpoints.
"""

from ._common import MissingExtraError, default_batch_to_inputs_targets

__all__ = ["MissingExtraError", "default_batch_to_inputs_targets"]
