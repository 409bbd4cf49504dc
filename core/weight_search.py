"""Weight search: a gradient-free search of a merge's mixing weights, as LoraHub searches its mixtures.

Given compatible parents (``core.merge.read_parents``), a merge method with its settings and a scoring
set (a few labelled examples or a benchmark slice), each tried point ``w`` is merged in memory
(``core.merge.merge_blocks``), loaded into one adapter attached once to the base model, and scored by
``core.evaluate`` (accuracy). The base model is loaded once and reused across points.

The points are a **random search**: point 1 is the merge settings' own weights (so the search never
reports worse than where it started), the others are drawn uniformly from ``[low, high]^N`` by a
``random.Random(seed)``; the same seed gives the same points. CMA-ES was not chosen: with 2 to 5
parents and a budget of tens of points (each one a full generation pass over the scoring set), its
default population (``4 + 3 ln N``, 6 to 8 points) leaves it two or three generations to adapt its
covariance, where it does no better than uniform draws, and it would need a dependency or 100 more
lines to get right. DARE's masks depend on the merge seed only, so every point sees the same masks.

The best point is the one with the highest score, the earliest on a tie.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from .config import EvalSettings
from .fields import ConfigError, show
from .inject import adapter_state_dict, attach, detach
from .merge import MergeSettings, Parent, block_tensors, merge_blocks, result_config, result_rank

MAX_BUDGET = 500
WEIGHT_BOUND = 10.0  # |low|, |high| at most: mixtures beyond are not what a search of weights is for


@dataclass
class SearchSettings:
    """How to search (the merge method and its other settings are ``core.merge.MergeSettings``).

    Attributes:
        budget: the number of points scored, the starting weights included (1 to ``MAX_BUDGET``).
        low, high: the range each drawn weight is taken from, ``low < high``; LoraHub uses [-1.5, 1.5].
        seed: seeds the draws.
    """

    budget: int = 12
    low: float = 0.0
    high: float = 1.0
    seed: int = 0

    def validate(self) -> "SearchSettings":
        """Check every field (``ConfigError`` naming it)."""
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or not 1 <= self.budget <= MAX_BUDGET:
            raise ConfigError("budget", f"must be a whole number of points from 1 to {MAX_BUDGET} (got "
                                        f"{show(self.budget)})")
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > WEIGHT_BOUND:
                raise ConfigError(name, f"must be a number from -{WEIGHT_BOUND:g} to {WEIGHT_BOUND:g} "
                                        f"(got {show(value)})")
        if not self.low < self.high:
            raise ConfigError("high", f"must be above low ({self.low:g}), got {self.high:g}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be a whole number from 0 (got {show(self.seed)})")
        self.low, self.high = float(self.low), float(self.high)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trial:
    """One scored point: its number (1-based, in the order tried), weights, accuracy and counts."""

    index: int
    weights: list[float]
    score: float
    correct: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search_points(start: Sequence[float], settings: SearchSettings) -> list[list[float]]:
    """The points to try: ``start`` first, then ``budget - 1`` seeded uniform draws in ``[low, high]^N``."""
    rng = random.Random(settings.seed)
    points = [list(map(float, start))]
    while len(points) < settings.budget:
        points.append([rng.uniform(settings.low, settings.high) for _ in start])
    return points


def search_record(trial: Trial) -> dict[str, Any]:
    """The metric point of a tried point (``core.metrics``' vocabulary, no column of its own): type
    ``"search"``, ``step`` its number, ``loss`` the error it minimises, ``1 - accuracy``."""
    return {"type": "search", "step": trial.index, "loss": 1.0 - trial.score}


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The highest score, the earliest on a tie."""
    if not trials:
        raise ValueError("no point was scored")
    return max(trials, key=lambda t: (t.score, -t.index))


def weight_search(model: Any, tokenizer: Any, parents: Sequence[Parent], merge: MergeSettings,
                  search: SearchSettings, benchmark: Any, eval_settings: EvalSettings, *,
                  on_trial: Callable[[Trial], None] | None = None, should_stop: Callable[[], bool] | None = None,
                  dtype: torch.dtype | None = None, template: str = "alpaca") -> list[Trial]:
    """Score the points of ``search`` (see the module docstring) on ``benchmark`` with ``model``, the bare
    base model (its adapter is attached here and detached at the end); return the trials in order.

    ``on_trial`` hears each trial as it is scored. ``should_stop()`` ends the search before the next
    point (or inside one, which is then not counted). ``ConfigError`` for invalid settings, incompatible
    parents, or weights the method refuses (naming the point).
    """
    from .evaluate import evaluate

    search.validate()
    merge.validate(len(parents))
    points = search_points(merge.weights, search)
    rank = result_rank([p.meta["adapter"] for p in parents], merge)
    attach(model, result_config([p.meta["adapter"] for p in parents], rank), tokenizer=tokenizer)
    own = adapter_state_dict(model)
    trials: list[Trial] = []
    try:
        for index, weights in enumerate(points, 1):
            if should_stop is not None and should_stop():
                break
            try:
                blocks, _ = merge_blocks(parents, dataclasses.replace(merge, weights=weights))
            except ConfigError as err:
                raise ConfigError(err.field, f"point {index} ({', '.join(f'{w:.3f}' for w in weights)}): "
                                             f"{err.message}") from None
            _load(own, block_tensors(blocks))
            res = evaluate(model, tokenizer, benchmark, eval_settings, should_stop=should_stop, dtype=dtype,
                           template=template)
            if res.stopped:
                break
            trial = Trial(index, weights, res.accuracy, res.correct, res.total)
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
    finally:
        detach(model)
    return trials


def _load(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy a merge's tensors into the attached adapter's parameters (``own``, sharing their storage)."""
    if set(own) != set(tensors):
        raise RuntimeError(f"merged tensors do not match the attached adapter: {sorted(set(own) ^ set(tensors))[:3]}")
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(tensors[key].to(p.dtype))
