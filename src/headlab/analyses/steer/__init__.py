"""Concept steering, one module per step:

- :mod:`~headlab.analyses.steer.concepts` — a concept's words, selection and held-out prompts,
  its tokens, and the concept frequency of generated text;
- :mod:`~headlab.analyses.steer.select` — which heads carry the concept (Head-Pursuit scores, a
  concept-mass sweep);
- :mod:`~headlab.analyses.steer.generate` — seeded, batched generation with heads rescaled;
- :mod:`~headlab.analyses.steer.core` — the conditions (clean; selected or random heads at each
  alpha) as parts, measured into one tidy table, and its per-alpha summary.

Every public name is re-exported here: ``from headlab.analyses.steer import steer`` works.
"""

from headlab.analyses.steer.concepts import CONCEPTS as CONCEPTS
from headlab.analyses.steer.concepts import Concept as Concept
from headlab.analyses.steer.concepts import ConceptTokens as ConceptTokens
from headlab.analyses.steer.concepts import concept_rate as concept_rate
from headlab.analyses.steer.concepts import concept_tokens as concept_tokens
from headlab.analyses.steer.concepts import get_concept as get_concept
from headlab.analyses.steer.concepts import words_of as words_of
from headlab.analyses.steer.core import Condition as Condition
from headlab.analyses.steer.core import ConditionOutput as ConditionOutput
from headlab.analyses.steer.core import SteerConfig as SteerConfig
from headlab.analyses.steer.core import SteerPart as SteerPart
from headlab.analyses.steer.core import SteerResult as SteerResult
from headlab.analyses.steer.core import conditions as conditions
from headlab.analyses.steer.core import random_sets as random_sets
from headlab.analyses.steer.core import steer as steer
from headlab.analyses.steer.core import steer_context as steer_context
from headlab.analyses.steer.core import steer_plan as steer_plan
from headlab.analyses.steer.core import steer_summary as steer_summary
from headlab.analyses.steer.core import steer_targets as steer_targets
from headlab.analyses.steer.core import with_baseline as with_baseline
from headlab.analyses.steer.generate import GenerateConfig as GenerateConfig
from headlab.analyses.steer.generate import encode_prompts as encode_prompts
from headlab.analyses.steer.generate import generate_ids as generate_ids
from headlab.analyses.steer.generate import generate_texts as generate_texts
from headlab.analyses.steer.generate import rescaled as rescaled
from headlab.analyses.steer.select import ConceptMass as ConceptMass
from headlab.analyses.steer.select import SelectSweepPart as SelectSweepPart
from headlab.analyses.steer.select import concept_batch as concept_batch
from headlab.analyses.steer.select import concept_dictionary as concept_dictionary
from headlab.analyses.steer.select import control_token_sets as control_token_sets
from headlab.analyses.steer.select import final_norm as final_norm
from headlab.analyses.steer.select import head_contributions as head_contributions
from headlab.analyses.steer.select import pursuit_scores as pursuit_scores
from headlab.analyses.steer.select import select_heads as select_heads
from headlab.analyses.steer.select import somp as somp
from headlab.analyses.steer.select import sweep_scores as sweep_scores
