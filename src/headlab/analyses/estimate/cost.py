"""What each importance measure costs, in forward-pass equivalents per example.

The unit is one full forward pass of one example. The cost model, one rule for every measure:

- a forward from layer ``L`` on (the earlier blocks replayed from a clean run, as the engine's
  prefix reuse and the layer-wise estimates do) costs ``(n_layers - L) / n_layers`` of one;
- a backward costs :data:`BACKWARD` forwards over the same layers;
- embedding and output head are not counted separately (they are part of "one forward").

So the exact single-head sweep costs one clean forward plus ``n_heads`` forwards from each layer
on (:func:`exact_sweep_cost`), attribution patching one forward and one backward
(:func:`gradient_cost`), and layer-wise integrated gradients with ``S`` steps one clean forward
plus ``S`` forward + backward passes from each layer on (:func:`ig_cost`). The estimators count
the same quantities while they run (:class:`headlab.analyses.estimate.ig.IGTerms` ``cost``), and
the tests check that both agree.
"""

from __future__ import annotations

from headlab.errors import ConfigError

__all__ = [
    "BACKWARD",
    "exact_sweep_cost",
    "forward_from",
    "gradient_cost",
    "ig_cost",
]

#: a backward pass, in forwards over the same layers (the usual 2x of the matrix products)
BACKWARD = 2.0


def forward_from(layer: int, n_layers: int) -> float:
    """A forward that starts at block ``layer`` (the earlier ones replayed), in full forwards."""
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} is outside 0..{n_layers - 1}")
    return (n_layers - layer) / n_layers


def exact_sweep_cost(n_layers: int, n_heads: int) -> float:
    """Exact ablation of every head alone (a sweep with prefix reuse): the clean forward plus
    ``n_heads`` forwards from each layer on."""
    return 1.0 + sum(n_heads * forward_from(ly, n_layers) for ly in range(n_layers))


def gradient_cost(counterfactual: bool = False) -> float:
    """Attribution patching and gradient importance: one forward and one backward (plus the
    forward that records a counterfactual's activations)."""
    return 1.0 + BACKWARD + (1.0 if counterfactual else 0.0)


def ig_cost(n_layers: int, steps: int, counterfactual: bool = False) -> float:
    """Layer-wise integrated gradients with ``steps`` points per layer: the clean forward (head
    outputs and block outputs for the replay), then per layer and step a forward and a backward
    from that layer on (plus the forward that records a counterfactual)."""
    per_step = (1.0 + BACKWARD) * sum(forward_from(ly, n_layers) for ly in range(n_layers))
    return 1.0 + steps * per_step + (1.0 if counterfactual else 0.0)
