"""Exact top-k heads at a fraction of a sweep's cost (``headlab sweep --top-k``).

- :mod:`~headlab.analyses.topk.rule`: the rule's options and statistics (interval widths for
  sampling without replacement, the spread a head's range is estimated from), pure numpy.
- :mod:`~headlab.analyses.topk.race`: the race, pure numpy, against any evaluator
  (:func:`race_top_k`; the simulation tests plug in a synthetic model).
- :mod:`~headlab.analyses.topk.search`: the parts that evaluate heads exactly with the sweep's
  engine, the driver that races every method with them (:func:`search`), and :func:`top_k`.
"""

from headlab.analyses.topk.race import RaceResult as RaceResult
from headlab.analyses.topk.race import race_top_k as race_top_k
from headlab.analyses.topk.rule import DIRECTIONS as DIRECTIONS
from headlab.analyses.topk.rule import RaceRule as RaceRule
from headlab.analyses.topk.rule import schedule as schedule
from headlab.analyses.topk.rule import serfling_width as serfling_width
from headlab.analyses.topk.rule import spread as spread
from headlab.analyses.topk.search import SEARCH_COLUMNS as SEARCH_COLUMNS
from headlab.analyses.topk.search import TopKCleanPart as TopKCleanPart
from headlab.analyses.topk.search import TopKPart as TopKPart
from headlab.analyses.topk.search import TopKSearch as TopKSearch
from headlab.analyses.topk.search import ranking as ranking
from headlab.analyses.topk.search import search as search
from headlab.analyses.topk.search import top_k as top_k

__all__ = [
    "DIRECTIONS",
    "SEARCH_COLUMNS",
    "RaceResult",
    "RaceRule",
    "TopKCleanPart",
    "TopKPart",
    "TopKSearch",
    "race_top_k",
    "ranking",
    "schedule",
    "search",
    "serfling_width",
    "spread",
    "top_k",
]
