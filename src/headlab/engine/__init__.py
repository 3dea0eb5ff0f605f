"""Executes plans and scores them. Every analysis goes through here.

:func:`run_plans` is the one entry point analyses use to score many plans on one batch. It loops
over sub-batches on the outside and plans on the inside, and skips work three ways, without ever
re-implementing a model's forward:

- **Prefix reuse.** One clean pass per sub-batch records every block's output. A plan whose first
  intervened layer is ``l`` runs with blocks ``0..l-1`` replaced by their recorded outputs
  (:func:`headlab.hooks.replay_blocks`); the model's own forward still runs everything else.
  Plans are grouped by first layer and run in that order.
- **Plan batching.** With ``max_batch_tokens``, several plans share one forward over stacked
  copies of the sub-batch, plan ``k`` acting on slice ``k``
  (:func:`headlab.hooks.intervene_stacked`). On CPU this gains nothing (the forward is
  compute-bound), so the default runs one plan per forward; ``"auto"`` sizes the stack from free
  GPU memory.
- **Logits only where needed.** The final hidden state is tapped at the model's output head
  (:func:`headlab.hooks.tap_output_head`). One-position metrics (``reads == "answer"``) make the
  model project only ``answer_pos`` (anything the model applies after the head still runs).
  Cross-entropy, top-k and KL apply the output head to windows of at most ``max_logit_tokens``
  tokens, so memory stays bounded; this needs a plain head (the model's logits equal
  ``get_output_embeddings()(hidden)``, checked on every clean run), otherwise full logits are used.
  Each window is projected once for all such metrics.
- **One scoring path.** The clean run and every intervened run are scored by the same function
  (:func:`_score`) on the same shapes, and every metric has one formula (cross-entropy is
  :func:`headlab.metrics.token_nll`), so a delta carries no bias from the scoring code.

A :class:`CleanCache` passed to several calls (a sweep calls once per layer) shares the clean
passes between them. The numbers equal those of one :func:`headlab.intervene` + full forward
per plan (up to float rounding, relative difference < 1e-5 in fp32).
"""

from headlab.engine.clean import CleanCache as CleanCache
from headlab.engine.plans import evaluate as evaluate
from headlab.engine.plans import run_plans as run_plans
from headlab.engine.score import concat_scores as concat_scores
from headlab.engine.score import forward_logits as forward_logits

__all__ = ["CleanCache", "concat_scores", "evaluate", "forward_logits", "run_plans"]
