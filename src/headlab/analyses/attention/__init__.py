"""The attention family: what heads look at, and whether looking is what matters.

- :mod:`~headlab.analyses.attention.maps`: a prompt's patterns as a tidy table, attention rollout
  (the one home of the rollout recurrence: :func:`mixed_attention`, :func:`rollout_matrices`);
- :mod:`~headlab.analyses.attention.mass`: attention mass on a token set (plausibility);
- :mod:`~headlab.analyses.attention.faith`: exact causal effects per head (faithfulness), one part
  per layer, and :func:`plausibility_faithfulness`;
- :mod:`~headlab.analyses.attention.rank`: the two rankings compared (Spearman rho with a
  bootstrap CI over examples, top-k overlap).
"""

from headlab.analyses.attention.faith import COUNTERFACTUAL as COUNTERFACTUAL
from headlab.analyses.attention.faith import EFFECT_COLUMNS as EFFECT_COLUMNS
from headlab.analyses.attention.faith import EffectPart as EffectPart
from headlab.analyses.attention.faith import Faithfulness as Faithfulness
from headlab.analyses.attention.faith import causal_effects as causal_effects
from headlab.analyses.attention.faith import effect_parts as effect_parts
from headlab.analyses.attention.faith import faithfulness_metric as faithfulness_metric
from headlab.analyses.attention.faith import (
    plausibility_faithfulness as plausibility_faithfulness,
)
from headlab.analyses.attention.maps import attention_map as attention_map
from headlab.analyses.attention.maps import attention_rollout as attention_rollout
from headlab.analyses.attention.maps import check_context as check_context
from headlab.analyses.attention.maps import map_tensor as map_tensor
from headlab.analyses.attention.maps import mixed_attention as mixed_attention
from headlab.analyses.attention.maps import prompt_batch as prompt_batch
from headlab.analyses.attention.maps import rollout_matrices as rollout_matrices
from headlab.analyses.attention.maps import token_labels as token_labels
from headlab.analyses.attention.mass import KEY_RULES as KEY_RULES
from headlab.analyses.attention.mass import MassPart as MassPart
from headlab.analyses.attention.mass import attention_mass as attention_mass
from headlab.analyses.attention.mass import attention_mass_scores as attention_mass_scores
from headlab.analyses.attention.mass import key_mask as key_mask
from headlab.analyses.attention.mass import query_mask as query_mask
from headlab.analyses.attention.mass import require_keys as require_keys
from headlab.analyses.attention.rank import TABLE_COLUMNS as TABLE_COLUMNS
from headlab.analyses.attention.rank import compare_rankings as compare_rankings
