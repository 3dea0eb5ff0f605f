"""The only package that touches PyTorch hooks.

:func:`intervene` installs a :class:`~headlab.Plan` as forward pre-hooks on the attention output
projections, so the *input* of each projection — the heads' outputs ``[batch, pos, head, d_head]``
— is edited before the heads are mixed. Hooks are always removed (also when the body raises), and
leaving the context raises if a planned hook never fired. :func:`capture` streams every layer's
head outputs to a callback; :func:`record` keeps them as :class:`~headlab.Activations`.

For the engine and the estimates: :func:`intervene_stacked` applies plan ``k`` to batch slice
``k`` of one forward; :func:`capture_blocks` / :func:`replay_blocks` record every block's output on
a clean run and later stand in for the early blocks (their ``forward`` temporarily returns the
recorded output, so nothing before the first intervened layer is recomputed);
:func:`tap_output_head` reads the final hidden state at the output head and can hand the head only
the positions a metric needs; :func:`add_to_heads` adds (gradient-tap) tensors to head outputs.

- :mod:`~headlab.hooks.plans`: :func:`intervene`, :func:`intervene_at`, :func:`intervene_stacked`,
  :class:`HookReport`.
- :mod:`~headlab.hooks.heads`: :func:`capture`, :func:`record`, :func:`add_to_heads`.
- :mod:`~headlab.hooks.blocks`: :class:`BlockOutput`, :func:`capture_blocks`,
  :func:`replay_blocks` (:func:`blocks_of` lives in :mod:`headlab.models.layout`).
- :mod:`~headlab.hooks.output`: :class:`HeadTap`, :func:`tap_output_head`.

The pure tensor work a hook does (a plan applied to one layer's head outputs) is
:mod:`headlab.interventions.apply`.
"""

from headlab.hooks.blocks import BlockOutput as BlockOutput
from headlab.hooks.blocks import capture_blocks as capture_blocks
from headlab.hooks.blocks import replay_blocks as replay_blocks
from headlab.hooks.heads import add_to_heads as add_to_heads
from headlab.hooks.heads import capture as capture
from headlab.hooks.heads import record as record
from headlab.hooks.output import HeadTap as HeadTap
from headlab.hooks.output import tap_output_head as tap_output_head
from headlab.hooks.plans import HookReport as HookReport
from headlab.hooks.plans import intervene as intervene
from headlab.hooks.plans import intervene_at as intervene_at
from headlab.hooks.plans import intervene_stacked as intervene_stacked
from headlab.models.layout import blocks_of as blocks_of

__all__ = [
    "BlockOutput",
    "HeadTap",
    "HookReport",
    "add_to_heads",
    "blocks_of",
    "capture",
    "capture_blocks",
    "intervene",
    "intervene_at",
    "intervene_stacked",
    "record",
    "replay_blocks",
    "tap_output_head",
]
