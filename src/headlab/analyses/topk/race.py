"""The racing rule of ``headlab sweep --top-k``, pure numpy: which heads to evaluate on which
examples next, and when a head is provably in or out of the top ``k``.

Vocabulary (used in every name below):

- the *population* is the ``N`` evaluation examples; a head's *target* is its exact sweep value on
  all of them (the mean of its per-example values ``z``, see :func:`race_top_k`);
- the *order* is one seeded random permutation of the examples, the same for every head (paired);
  a head evaluated on ``n`` examples has seen the first ``n`` of the order, so its examples are a
  uniform random sample without replacement;
- the *schedule* is the sizes ``n`` at which intervals are computed: ``first, first*growth, ...``
  and finally ``N`` (a head evaluated on all ``N`` examples is *exact*: a zero-width interval);
- the *key* is what ranks heads: ``|delta|`` (``abs``), the sweep's ``effect`` (``hurts``) or
  ``-effect`` (``helps``);
- a head is *accepted* (in the top k), *eliminated* (out) or *active* (still raced), separately
  for every metric.

The rule (documented at length in ``docs/topk.md``):

1. Round 0 evaluates every head on the first ``first`` examples of the order. Round 1 evaluates
   the ``leaders`` most promising heads (by a cheap priority: the round-0 means, or an attribution
   estimate) on every example, so the bar the others must clear is exact early. Later rounds take
   every active head to the next size of the schedule.
2. After each round every head gets an interval for its target that holds, simultaneously for all
   heads, sizes, metrics and methods, with probability ``>= confidence`` (a union bound): the
   tighter of the Hoeffding-Serfling and the empirical Bernstein-Serfling bounds for sampling
   without replacement (Bardenet & Maillard 2015), each at half the error budget. Both need the
   range of the head's ``N`` values, which is unknown. It is taken as ``f`` times the head's
   *spread* on its sample (the sample's range plus its largest magnitude), where ``f`` is
   ``range_factor`` or, once some heads are exact, the largest ratio of full range to spread that
   any exact head shows at the same sample size: the data check the assumption and widen it where
   it fails (a head whose effect sits in a few examples). No decision is made before that check
   exists. This is the one assumption behind the confidence (see ``docs/topk.md``).
3. With ``[lo, hi]`` the interval of the key: a head is eliminated when ``hi`` is below the
   ``k``-th largest ``lo``; accepted when at most ``k - 1`` other heads have ``hi >= lo``. The
   race stops when ``k`` heads are accepted, when every head is decided or exact, or when the
   budget (``max_cost``) is spent (then the heads still raced are *undecided*).

Exact ties are broken by head index (lower first), as the full sweep's ranking does (a stable
sort of heads in (layer, head) order): a head tied with the ``k``-th is never eliminated or
accepted by the intervals, so it is evaluated on every example and the tie is then broken by index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from headlab.analyses.topk.rule import RaceRule, schedule, serfling_width, spread
from headlab.analyses.topk.rule import key as _key
from headlab.analyses.topk.rule import key_interval as _key_interval

__all__ = ["Race", "RaceResult", "race_top_k"]

ACTIVE, ACCEPTED, ELIMINATED = 0, 1, 2


@dataclass
class RaceResult:
    """What a race decided, per head and metric (arrays ``[head, metric]``).

    Attributes:
        n: examples each head was evaluated on (``[head]``).
        mean: each head's mean value on those examples (the target when ``n == N``).
        lo, hi: the interval of the target (``lo == hi == mean`` when exact).
        key: the ranking key's point value (from ``mean``).
        status: ``"top-k"``, ``"eliminated"`` or ``"undecided"``.
        selected: the ``k`` heads returned per metric (undecided ones included when the budget
            stopped the race: then not guaranteed).
        n_needed: for undecided heads, how many examples the interval widths suggest would
            decide them (``N`` if only all of them would); 0 elsewhere.
        guaranteed: per metric, whether the selected set is decided (no undecided head).
        statistical: per metric, whether any decision used an interval (``False``: every head
            that mattered was evaluated on every example, so the answer is exact).
        evaluations: head-example evaluations run (the full sweep runs ``heads * N``).
        rounds: per round, ``(heads evaluated, evaluations)``.
        factors: per sample size, the range factor of each metric the last intervals used.
    """

    n: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    key: np.ndarray
    status: np.ndarray
    selected: np.ndarray
    n_needed: np.ndarray
    guaranteed: np.ndarray
    statistical: np.ndarray
    evaluations: int
    rounds: list[tuple[int, int]] = field(default_factory=list)
    factors: dict[int, list[float]] = field(default_factory=dict)


class Race:
    """One race: ``n_heads`` heads (one method) over ``n_examples`` examples, every metric at
    once. Drive it with :meth:`plan` (what to evaluate next), :meth:`add` (the values that came
    back) and :meth:`decide`; :func:`race_top_k` does this with an evaluator, a job does it with
    parts saved round by round (everything here is deterministic given the values added).

    Args:
        n_heads, n_examples, n_metrics: the sizes.
        rule: the rule's options (checked here).
        signs: ``[metric]`` -1 where higher is better (effect = -delta), else 1.
        delta: this race's share of ``1 - confidence`` (a job with several methods splits it).
        priority: ``[head, metric]`` a cheap estimate of the key that picks the leaders (default:
            the round-0 means). It orders work only; it never decides.
    """

    def __init__(
        self,
        n_heads: int,
        n_examples: int,
        n_metrics: int,
        rule: RaceRule,
        *,
        signs: Sequence[float] | None = None,
        delta: float | None = None,
        priority: np.ndarray | None = None,
    ) -> None:
        self.rule = rule.check(n_heads, n_examples)
        self.H, self.N, self.M = n_heads, n_examples, n_metrics
        self.signs = np.ones(n_metrics) if signs is None else np.asarray(signs, dtype=float)
        self.sizes = schedule(n_examples, rule.first, rule.growth)
        self.delta = (1 - rule.confidence) if delta is None else float(delta)
        # one-sided tests: every head, metric and size below N, two sides each (union bound)
        tests = n_heads * n_metrics * max(1, len(self.sizes) - 1) * 2
        self.delta_test = self.delta / tests
        self.priority = priority
        self.order = np.random.default_rng(rule.seed).permutation(n_examples)
        self.values = np.full((n_heads, n_examples, n_metrics), np.nan)  # [head, order pos, metric]
        self.n = np.zeros(n_heads, dtype=int)
        self.status = np.full((n_heads, n_metrics), ACTIVE, dtype=np.int8)
        self.lo = np.full((n_heads, n_metrics), -np.inf)
        self.hi = np.full((n_heads, n_metrics), np.inf)
        #: the range factor used at each sample size (see :meth:`_factor`)
        self.factors: dict[int, np.ndarray] = {}
        self.round = 0
        self.evaluations = 0
        self.rounds: list[tuple[int, int]] = []
        self.budget_stop = False

    # -- planning ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[int, int, int]]:
        """The next round's work as ``(head, start, stop)``: evaluate ``head`` on the examples at
        positions ``start:stop`` of the order (empty: the race is over). Calling it again
        without :meth:`add` returns the same plan."""
        if self.done():
            return []
        active = self._active()
        lead = self.rule.n_leaders > 0
        if self.round == 0:
            work = [(h, 0, self.rule.first) for h in range(self.H)]
        elif lead and self.round == 1:  # the leaders alone, on every example: an exact bar
            work = [(h, int(self.n[h]), self.N) for h in sorted(self._leaders(active))]
        else:
            step = self.sizes[min(self.round - int(lead), len(self.sizes) - 1)]
            work = [
                (int(h), int(self.n[h]), step) for h in np.flatnonzero(active) if step > self.n[h]
            ]
        if self.rule.max_cost is not None:
            cost = sum(stop - start for _, start, stop in work)
            if self.evaluations + cost > self.rule.max_cost * self.H * self.N:
                self.budget_stop = True
                return []
        return work

    def _active(self) -> np.ndarray:
        """``[head]`` heads still raced in some metric and not yet exact."""
        return (self.status == ACTIVE).any(1) & (self.n < self.N)

    def _leaders(self, active: np.ndarray) -> set[int]:
        """The most promising active heads per metric (by the priority, else round-0 means)."""
        count = self.rule.n_leaders
        if count == 0:
            return set()
        prio = self.priority
        if prio is None:
            prio = _key(self._means(), self.signs, self.rule.direction)
        out: set[int] = set()
        for m in range(self.M):
            cand = np.flatnonzero(active & (self.status[:, m] == ACTIVE))
            ranked = cand[np.lexsort((cand, -prio[cand, m]))]  # key descending, then index
            out.update(int(h) for h in ranked[:count])
        return out

    def done(self) -> bool:
        if self.budget_stop:
            return True
        if self.round == 0:
            return False
        return not self._active().any()

    # -- results of a round --------------------------------------------------------------------
    def add(self, head: int, start: int, values: np.ndarray) -> None:
        """Values ``[examples, metric]`` of ``head`` on order positions ``start:start+len``."""
        values = np.asarray(values, dtype=float).reshape(-1, self.M)
        stop = start + values.shape[0]
        if start != self.n[head]:
            raise ValueError(f"head {head} has {self.n[head]} examples; got values from {start}")
        self.values[head, start:stop] = values
        self.n[head] = stop
        self.evaluations += values.shape[0]

    def decide(self, work: Sequence[tuple[int, int, int]] = ()) -> None:
        """Update every interval and status after a round (``work``: the round's plan, for the
        round log)."""
        self.rounds.append((len(work), sum(stop - start for _, start, stop in work)))
        self.round += 1
        self._intervals()
        if self.rule.n_leaders > 0 and not (self.n >= self.N).any():
            return  # no decision before some head is exact and calibrates the ranges
        k = self.rule.k
        key_lo, key_hi = _key_interval(self.lo, self.hi, self.signs, self.rule.direction)
        for m in range(self.M):
            st = self.status[:, m]
            lo, hi = key_lo[:, m], key_hi[:, m]
            alive = st != ELIMINATED  # never fewer than k: the k best lower bounds stay
            bar = np.sort(lo[alive])[-k]  # the k-th largest lower bound
            out = (st == ACTIVE) & (hi < bar)
            # heads that at most k-1 others could beat (ties counted as beating); every head of
            # the true top k is alive, so a head outside it is beaten by at least k alive ones
            beaten_by = ((hi[None, :] >= lo[:, None]) & alive[None, :]).sum(1) - 1
            accept = (st == ACTIVE) & ~out & (beaten_by <= k - 1)
            st[out] = ELIMINATED
            st[accept] = ACCEPTED
            taken = np.flatnonzero(st == ACCEPTED)
            if taken.size > k:  # only if intervals contradict each other: keep the k surest
                keep = taken[np.lexsort((taken, -lo[taken]))][:k]
                st[np.setdiff1d(taken, keep)] = ACTIVE
            if (st == ACCEPTED).sum() >= k:
                st[st == ACTIVE] = ELIMINATED
            elif ((st == ACTIVE) & (self.n < self.N)).sum() == 0:
                self._settle_exact(m)

    def _settle_exact(self, m: int) -> None:
        """Every head still raced is exact: the best of them by key, ties by index, fill the k."""
        st = self.status[:, m]
        need = self.rule.k - int((st == ACCEPTED).sum())
        rest = np.flatnonzero(st == ACTIVE)
        key = _key(self._means()[:, m : m + 1], self.signs[m : m + 1], self.rule.direction)[:, 0]
        ranked = rest[np.lexsort((rest, -key[rest]))]
        st[ranked[:need]] = ACCEPTED
        st[ranked[need:]] = ELIMINATED

    def _means(self) -> np.ndarray:
        """``[head, metric]`` mean of each head's values so far (0 before any)."""
        return np.nansum(self.values, axis=1) / np.maximum(self.n, 1)[:, None]

    def _factor(self, n: int) -> np.ndarray:
        """``[metric]`` how many times its spread over the first ``n`` examples (:func:`spread`)
        a head's range over all of them is taken to be: ``range_factor``, or more where a head
        already evaluated on every example shows a larger ratio (heads whose effect sits in a
        few examples)."""
        factor = np.full(self.M, float(self.rule.range_factor))
        exact = self.n >= self.N
        if exact.any() and n < self.N:
            v = self.values[exact]  # [heads, example, metric]
            full = v.max(1) - v.min(1)
            part = spread(v[:, :n])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(part > 0, full / part, np.where(full > 0, np.inf, 1.0))
            factor = np.maximum(factor, ratio.max(0))
        return factor

    def _intervals(self) -> None:
        seen = self.n > 0
        mean = self._means()
        sd = np.zeros_like(mean)
        span = np.zeros_like(mean)
        for n in np.unique(self.n[seen]):
            rows = np.flatnonzero(self.n == n)
            v = self.values[rows, :n]  # [heads, n, metric]
            sd[rows] = v.std(axis=1)
            self.factors[int(n)] = self._factor(int(n))
            span[rows] = self.factors[int(n)] * spread(v)
        width = np.zeros_like(mean)
        with np.errstate(invalid="ignore"):  # an infinite factor on a zero range: no bound
            width[seen] = serfling_width(
                self.n[seen][:, None], self.N, sd[seen], span[seen], self.delta_test
            )
        width = np.where(np.isnan(width), np.inf, width)
        self.lo = np.where(seen[:, None], mean - width, -np.inf)
        self.hi = np.where(seen[:, None], mean + width, np.inf)

    # -- the answer ----------------------------------------------------------------------------
    def result(self) -> RaceResult:
        """Statuses, intervals and the selected heads (call when :meth:`plan` returns nothing)."""
        k = self.rule.k
        mean = self._means()
        key = _key(mean, self.signs, self.rule.direction)
        status = np.full((self.H, self.M), "eliminated", dtype=object)
        selected = np.zeros((self.H, self.M), dtype=bool)
        n_needed = np.zeros((self.H, self.M), dtype=int)
        guaranteed = np.ones(self.M, dtype=bool)
        for m in range(self.M):
            st = self.status[:, m]
            status[st == ACCEPTED, m] = "top-k"
            status[st == ACTIVE, m] = "undecided"
            selected[st == ACCEPTED, m] = True
            rest = np.flatnonzero(st == ACTIVE)
            if rest.size:
                guaranteed[m] = False
                need = k - int((st == ACCEPTED).sum())
                ranked = rest[np.lexsort((rest, -key[rest, m]))]
                selected[ranked[:need], m] = True
                n_needed[rest, m] = self._needed(rest, m)
        return RaceResult(
            n=self.n.copy(), mean=mean, lo=self.lo.copy(), hi=self.hi.copy(), key=key,
            status=status, selected=selected, n_needed=n_needed, guaranteed=guaranteed,
            statistical=((self.n < self.N)[:, None] & (self.status != ACTIVE)).any(0),
            evaluations=self.evaluations,
            rounds=list(self.rounds),
            factors={n: [float(x) for x in f] for n, f in sorted(self.factors.items())},
        )  # fmt: skip

    def _needed(self, heads: np.ndarray, m: int) -> np.ndarray:
        """Examples at which the interval of each of ``heads`` would clear the bar (its width
        shrunk as the bound predicts with the same spread), else ``N``."""
        key_lo, _ = _key_interval(self.lo, self.hi, self.signs, self.rule.direction)
        alive = self.status[:, m] != ELIMINATED
        bar = np.sort(key_lo[alive, m])[-self.rule.k]
        point = _key(self._means(), self.signs, self.rule.direction)[heads, m]
        gap = np.abs(point - bar)
        out = np.full(heads.size, self.N)
        for i, h in enumerate(heads):
            n0 = int(self.n[h])
            v = self.values[h, :n0, m]
            sd = np.array([v.std()])
            span = self._factor(n0)[m : m + 1] * spread(v[None, :, None])[0]
            with np.errstate(invalid="ignore"):
                for n in range(n0, self.N):
                    w = serfling_width(np.array([n]), self.N, sd, span, self.delta_test)[0]
                    if w < gap[i]:
                        out[i] = n
                        break
        return out


def race_top_k(
    evaluate: Callable[[list[int], np.ndarray], np.ndarray],
    n_heads: int,
    n_examples: int,
    n_metrics: int,
    rule: RaceRule,
    *,
    signs: Sequence[float] | None = None,
    delta: float | None = None,
    priority: np.ndarray | None = None,
) -> RaceResult:
    """Race ``n_heads`` heads to the top ``rule.k`` with an evaluator.

    ``evaluate(heads, examples)`` returns ``[len(heads), len(examples), n_metrics]`` per-example
    values ``z`` of each head on each example (indices into the ``n_examples`` examples) whose
    mean over all examples is the head's target (for a sweep: the per-example change of the
    metric, scaled so that its mean is the sweep's token-weighted ``delta``). See :class:`Race`.
    """
    race = Race(n_heads, n_examples, n_metrics, rule, signs=signs, delta=delta, priority=priority)
    while work := race.plan():
        groups: dict[tuple[int, int], list[int]] = {}
        for h, start, stop in work:
            groups.setdefault((start, stop), []).append(h)
        for (start, stop), heads in groups.items():
            vals = np.asarray(evaluate(heads, race.order[start:stop]), dtype=float)
            for h, v in zip(heads, vals, strict=True):
                race.add(h, start, v)
        race.decide(work)
    return race.result()
