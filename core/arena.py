"""The blind arena's statistics: a Bradley-Terry leaderboard from pairwise votes, and which pair to ask next.

Pure maths (numpy only, no torch, no database): ``jobs.arena`` feeds it the votes of a pool.

**The model.** Model ``i`` has a log-strength ``θ_i``; in a battle with ``j`` it is preferred with
probability ``σ(θ_i - θ_j) = 1 / (1 + exp(θ_j - θ_i))`` (Bradley and Terry 1952). A vote gives model A
the score ``s`` = 1 (A better), 0 (B better) or ½ (a tie, or both bad: half a win each way), and B the
score ``1 - s``. With ``W_ij`` the total score of ``i`` against ``j`` and ``N_ij = W_ij + W_ji`` the
battles between them, the log-likelihood is

    ℓ(θ) = Σ_{i≠j} W_ij log σ(θ_i - θ_j).

Its maximum is infinite for a model that never lost. The prior adds, for every model, ``prior``
virtual battles tied with a reference player of strength 0 (the pool average):

    ℓ_p(θ) = ℓ(θ) + prior · Σ_i [½ log σ(θ_i) + ½ log σ(-θ_i)],

which is strictly concave, so the maximiser is unique and finite. It is found by Newton's method:

    g_i  = Σ_j (W_ij - N_ij σ_ij) + prior (½ - σ(θ_i))                  (gradient, σ_ij = σ(θ_i - θ_j))
    -H_ii = Σ_j N_ij σ_ij (1 - σ_ij) + prior σ(θ_i)(1 - σ(θ_i)),  -H_ij = -N_ij σ_ij (1 - σ_ij)
    θ ← θ + (-H)⁻¹ g                  (each step capped at ``MAX_STEP`` in any coordinate)

``-H`` is strictly diagonally dominant (the prior term), hence invertible. Every function works on a
batch of score matrices at once (shape ``(B, K, K)``), so the bootstrap fits all its replicates in
one set of batched solves.

**The scale.** Ratings are Elo-like: ``1000 + (400 / ln 10) · (θ_i - mean θ)``, so the pool's mean is
1000 and 400 points are a 10:1 odds ratio, as in chess.

**The intervals.** Votes are resampled with replacement (a vote is one of ``K·K·3`` kinds: who was A,
who was B, and the score, so a resample is one multinomial draw over those kinds); each replicate is
fitted and re-centred; the interval is the percentile interval of the replicates (seeded: the same
votes give the same intervals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

VOTES = ("a", "b", "tie", "both_bad")
SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # model A's score; B gets 1 - score
ELO_SCALE = 400.0 / math.log(10.0)
MEAN_RATING = 1000.0
DEFAULT_PRIOR = 1.0       # virtual ties of each model with the pool average
MAX_STEP = 2.0            # largest change of one log-strength in one Newton step (keeps early steps sane)
CLOSE_RATINGS = 200.0     # rating gap at which pairing's preference for close pairs has fallen to 1/e


class ArenaError(ValueError):
    """Votes or settings that cannot be used (the message names which)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ(x)


def fit_bradley_terry(wins: np.ndarray, prior: float = DEFAULT_PRIOR, tol: float = 1e-9,
                      max_iter: int = 100) -> np.ndarray:
    """The maximiser ``θ`` of the penalised Bradley-Terry log-likelihood (module docstring).

    Args:
        wins: ``(K, K)`` or a batch ``(B, K, K)``; ``wins[..., i, j]`` = score of ``i`` against ``j``
            (ties counted half each way). The diagonal must be zero.
        prior: virtual ties of every model with the reference player (> 0).
        tol: stop when every gradient component is below this.
        max_iter: Newton steps at most.

    Returns:
        Log-strengths of shape ``(K,)`` or ``(B, K)``, relative to the reference player (not centred).
    """
    if not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior > 0):
        raise ArenaError(f"prior must be a positive number of virtual ties (got {prior!r})")
    w = np.asarray(wins, dtype=np.float64)
    single = w.ndim == 2
    if single:
        w = w[None]
    if w.ndim != 3 or w.shape[1] != w.shape[2]:
        raise ArenaError(f"wins must be a square matrix or a batch of them (got shape {np.shape(wins)})")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ArenaError("wins must be finite and non-negative")
    k = w.shape[1]
    eye = np.eye(k, dtype=bool)
    if w[:, eye].any():
        raise ArenaError("a model cannot play itself: the diagonal of wins must be zero")
    games = w + np.swapaxes(w, 1, 2)
    row_wins = w.sum(axis=2)
    theta = np.zeros(w.shape[:2])
    for _ in range(max_iter):
        s = _sigmoid(theta[:, :, None] - theta[:, None, :])
        ref = _sigmoid(theta)
        grad = row_wins - (games * s).sum(axis=2) + prior * (0.5 - ref)
        if np.abs(grad).max(initial=0.0) < tol:
            break
        curvature = games * s * (1.0 - s)
        neg_hessian = -curvature
        neg_hessian[:, eye] = curvature.sum(axis=2) + prior * ref * (1.0 - ref)
        step = np.linalg.solve(neg_hessian, grad[..., None])[..., 0]
        biggest = np.abs(step).max(axis=1, keepdims=True)
        theta = theta + step / np.maximum(1.0, biggest / MAX_STEP)
    return theta[0] if single else theta


def to_ratings(theta: np.ndarray) -> np.ndarray:
    """Log-strengths to the Elo-like scale, centred so each row's mean is ``MEAN_RATING``."""
    theta = np.asarray(theta, dtype=np.float64)
    return MEAN_RATING + ELO_SCALE * (theta - theta.mean(axis=-1, keepdims=True))


def expected_score(rating_i: float, rating_j: float) -> float:
    """P(i preferred to j) under the model, from two ratings on the Elo-like scale."""
    return float(_sigmoid(np.float64((rating_i - rating_j) / ELO_SCALE)))


def _indexed(votes: Iterable[Sequence[Any]], models: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """The models (given ones first, then any others seen in votes) and ``(n, 3)`` rows (a, b, A's score)."""
    names = list(dict.fromkeys(models or []))
    index = {m: i for i, m in enumerate(names)}
    rows = []
    for n, vote in enumerate(votes):
        try:
            a, b, outcome = vote
        except (TypeError, ValueError):
            raise ArenaError(f"vote {n}: expected (model_a, model_b, vote), got {vote!r}") from None
        if outcome not in SCORES:
            raise ArenaError(f"vote {n}: {outcome!r} is not one of {', '.join(VOTES)}")
        if a == b:
            raise ArenaError(f"vote {n}: model {a!r} cannot be compared with itself")
        for m in (a, b):
            if m not in index:
                index[m] = len(names)
                names.append(m)
        rows.append((index[a], index[b], SCORES[outcome]))
    return names, np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def score_matrix(rows: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``W`` (``(K, K)``) from vote rows ``(a, b, score)``, each counted ``weights`` times (default once)."""
    w = np.zeros((k, k))
    if len(rows):
        a, b, score = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2]
        weight = np.ones(len(rows)) if weights is None else weights
        np.add.at(w, (a, b), weight * score)
        np.add.at(w, (b, a), weight * (1.0 - score))
    return w


def bootstrap_ratings(rows: np.ndarray, k: int, n_boot: int = 200, seed: int = 0,
                      prior: float = DEFAULT_PRIOR) -> np.ndarray:
    """``(n_boot, K)`` ratings of votes resampled with replacement (one multinomial draw per replicate
    over the distinct kinds of vote, which is the same as resampling the votes themselves)."""
    if n_boot < 1:
        raise ArenaError(f"n_boot must be at least 1 (got {n_boot})")
    if not len(rows):
        return to_ratings(np.zeros((n_boot, k)))
    kinds, counts = np.unique(rows, axis=0, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(rows), counts / counts.sum(), size=n_boot).astype(np.float64)
    # the score matrix of each replicate is linear in its draw counts: W_b = Σ_c draws[b, c] · W(kind c)
    basis = np.stack([score_matrix(kind[None], k).ravel() for kind in kinds])
    wins = (draws @ basis).reshape(n_boot, k, k)
    return to_ratings(fit_bradley_terry(wins, prior))


@dataclass
class Leaderboard:
    """The fitted pool. Arrays are in ``models`` order (best first)."""

    models: list[str]
    ratings: np.ndarray              # (K,) Elo-like, mean 1000
    lower: np.ndarray                # (K,) the interval's ends (``level``, from the bootstrap)
    upper: np.ndarray
    wins: np.ndarray                 # (K,) votes won, lost, tied ("tie" and "both bad")
    losses: np.ndarray
    ties: np.ndarray
    games: np.ndarray                # (K, K) battles between i and j
    win_rate: np.ndarray             # (K, K) mean score of i against j (NaN where they never met)
    level: float = 0.95
    n_votes: int = 0
    bootstrap: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per model, best first: rank, model, rating, lower, upper, votes, wins, ties, losses."""
        return [{"rank": i + 1, "model": m, "rating": float(self.ratings[i]), "lower": float(self.lower[i]),
                 "upper": float(self.upper[i]), "votes": int(self.wins[i] + self.losses[i] + self.ties[i]),
                 "wins": int(self.wins[i]), "ties": int(self.ties[i]), "losses": int(self.losses[i])}
                for i, m in enumerate(self.models)]


def leaderboard(votes: Iterable[Sequence[Any]], models: Sequence[str] | None = None, n_boot: int = 200,
                seed: int = 0, prior: float = DEFAULT_PRIOR, level: float = 0.95) -> Leaderboard:
    """Fit the pool: ratings, ``level`` bootstrap intervals, vote counts and the win-rate matrix.

    ``votes``: ``(model_a, model_b, vote)`` with ``vote`` in ``VOTES``; ``models``: every contestant
    (so a model without votes is listed too, at the prior's rating), others are added from the votes.
    """
    if not 0 < level < 1:
        raise ArenaError(f"level must be within (0, 1) (got {level!r})")
    names, rows = _indexed(votes, models)
    k = len(names)
    if k == 0:
        empty = np.zeros(0)
        return Leaderboard([], empty, empty, empty, empty, empty, empty, np.zeros((0, 0)), np.zeros((0, 0)),
                           level=level)
    wins_matrix = score_matrix(rows, k)
    ratings = to_ratings(fit_bradley_terry(wins_matrix, prior))
    replicates = bootstrap_ratings(rows, k, n_boot, seed, prior)
    tail = 100 * (1 - level) / 2
    lower, upper = np.percentile(replicates, [tail, 100 - tail], axis=0)
    games = np.zeros((k, k))
    if len(rows):
        np.add.at(games, (rows[:, 0].astype(int), rows[:, 1].astype(int)), 1.0)
    games = games + games.T
    with np.errstate(invalid="ignore", divide="ignore"):
        win_rate = np.where(games > 0, wins_matrix / np.where(games > 0, games, 1.0), np.nan)
    won, lost, tied = np.zeros(k), np.zeros(k), np.zeros(k)
    for a, b, score in rows:
        a, b = int(a), int(b)
        if score == 0.5:
            tied[[a, b]] += 1
        else:
            winner, loser = (a, b) if score == 1.0 else (b, a)
            won[winner] += 1
            lost[loser] += 1
    order = np.argsort(-ratings, kind="stable")
    return Leaderboard(models=[names[i] for i in order], ratings=ratings[order], lower=lower[order],
                       upper=upper[order], wins=won[order], losses=lost[order], ties=tied[order],
                       games=games[np.ix_(order, order)], win_rate=win_rate[np.ix_(order, order)],
                       level=level, n_votes=len(rows), bootstrap=n_boot)


def pair_weights(games: np.ndarray, ratings: np.ndarray, closeness: float = CLOSE_RATINGS) -> np.ndarray:
    """How strongly to favour each pair ``i < j`` (zero elsewhere): few votes or close ratings.

    ``w_ij = 1 / (1 + N_ij) + exp(-|r_i - r_j| / closeness)``: a pair that has never met scores at
    least 1, a pair of equal ratings at least 1, a well-measured lopsided pair close to 0.
    """
    games = np.asarray(games, dtype=np.float64)
    ratings = np.asarray(ratings, dtype=np.float64)
    k = len(ratings)
    if games.shape != (k, k):
        raise ArenaError(f"games must be {k}x{k} to match {k} ratings (got {games.shape})")
    gap = np.abs(ratings[:, None] - ratings[None, :])
    weights = 1.0 / (1.0 + games) + np.exp(-gap / closeness)
    return np.triu(weights, k=1)


def choose_pair(games: np.ndarray, ratings: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Draw a pair ``(A, B)`` with probability proportional to ``pair_weights``; sides in random order."""
    weights = pair_weights(games, ratings)
    total = weights.sum()
    if len(ratings) < 2 or total <= 0:
        raise ArenaError("a battle needs at least two models")
    flat = int(rng.choice(weights.size, p=(weights / total).ravel()))
    i, j = divmod(flat, len(ratings))
    return (i, j) if rng.random() < 0.5 else (j, i)
