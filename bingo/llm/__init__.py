"""Structured pruning of causal language models (heads / key-value groups and MLP neurons), the
pieces of the LLM benchmark against the field (issue 18), built so far:

* :mod:`bingo.llm.text`: a token stream split into train / calibration / validation / test,
  windows of it, perplexity;
* :mod:`bingo.llm.checkpoint`: loading a local ``transformers`` checkpoint the way a user's is
  loaded, with one-line errors before any long work, and a character tokenizer that saves as an
  ordinary one;
* :mod:`bingo.llm.torch_pruning_peer`: Torch-Pruning's own LLM pruner, the peer library, run on
  a transformers Llama with grouped-query attention.

The re-implemented methods live with the other baselines: FLAP (:mod:`bingo.baselines.flap`),
Bonsai (:mod:`bingo.baselines.bonsai`), Wanda-sp (``wanda(variant="wanda-sp")``), LLM-Pruner's
first-order Taylor (:mod:`bingo.baselines.taylor`).
"""
