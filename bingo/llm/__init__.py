"""Structured pruning of causal language models (attention heads / key-value groups and MLP
neurons), and the benchmark against the LLM pruning field (docs/llm.md):

* :mod:`bingo.llm.recipe`: bingo's setting for a causal LM (targeted elimination sized to the
  model, then the least-squares refit);
* :mod:`bingo.llm.prune_checkpoint` / :mod:`bingo.llm.command`: ``bingo llm prune``, the setting
  run on a user's local ``transformers`` checkpoint, the smaller model saved so that it reloads;
* :mod:`bingo.llm.compare` (configuration and command line), :mod:`bingo.llm.compare_pipeline`
  (the steps) and :mod:`bingo.llm.compare_report` (summary, tables, plots): ``bingo llm bench``;
* :mod:`bingo.llm.text`: a token stream split into train / calibration / validation / test,
  windows of it, perplexity;
* :mod:`bingo.llm.checkpoint`: loading a local ``transformers`` checkpoint the way a user's is
  loaded, with one-line errors before any long work, and a character tokenizer that saves as an
  ordinary one;
* :mod:`bingo.llm.budget`: units to a fraction of the transformer blocks' parameters;
* :mod:`bingo.llm.torch_pruning_peer`: Torch-Pruning's own LLM pruner, the peer library, run on
  a transformers Llama with grouped-query attention.

The re-implemented methods live with the other baselines: FLAP (:mod:`bingo.baselines.flap`),
Bonsai (:mod:`bingo.baselines.bonsai`), Wanda-sp (``wanda(variant="wanda-sp")``), LLM-Pruner's
first-order Taylor (:mod:`bingo.baselines.taylor`).
"""
