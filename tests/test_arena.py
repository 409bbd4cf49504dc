"""The blind arena: the Bradley-Terry leaderboard on simulated votes (seeded), the votes' storage and the
service's checks on SQLite and PostgreSQL, and the Arena tab's handlers generating with the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core import arena
from core.arena import ArenaError

TRUE_RATINGS = np.array([1240.0, 1110.0, 1000.0, 930.0, 720.0])  # mean 1000: the scale the fit reports


def simulate(rng: np.random.Generator, ratings: np.ndarray, n: int, tie_rate: float = 0.1) -> list[tuple]:
    """``n`` votes between uniformly drawn pairs, A's expected score ``σ(Δθ)`` exactly: with probability
    ``tie_rate`` a tie or "both bad" (half a win each way), else A wins with ``q`` such that
    ``tie_rate / 2 + (1 - tie_rate) q = σ(θ_A - θ_B)``."""
    k = len(ratings)
    names = [f"m{i}" for i in range(k)]
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p = 1.0 / (1.0 + np.exp(-(ratings[a] - ratings[b]) / arena.ELO_SCALE))
    q = (p - tie_rate / 2) / (1 - tie_rate)
    tie = rng.random(n) < tie_rate
    a_wins = rng.random(n) < q
    outcome = np.where(tie, np.where(rng.random(n) < 0.5, "tie", "both_bad"), np.where(a_wins, "a", "b"))
    return [(names[i], names[j], str(o)) for i, j, o in zip(a, b, outcome)]


def penalised_loglik(theta: np.ndarray, wins: np.ndarray, prior: float) -> float:
    """The objective written out term by term (the reference the fit is checked against)."""
    total = 0.0
    k = len(theta)
    for i in range(k):
        for j in range(k):
            if i != j and wins[i, j]:
                total += wins[i, j] * math.log(1 / (1 + math.exp(theta[j] - theta[i])))
        total += prior * (0.5 * math.log(1 / (1 + math.exp(-theta[i]))) + 0.5 * math.log(1 / (1 + math.exp(theta[i]))))
    return total


# ------------------------------------------------------------------------------------ the maths

def test_fit_is_the_maximum_of_the_penalised_likelihood():
    rng = np.random.default_rng(3)
    wins = rng.integers(0, 9, (4, 4)).astype(float) + rng.integers(0, 2, (4, 4)) * 0.5
    np.fill_diagonal(wins, 0)
    theta = arena.fit_bradley_terry(wins, prior=1.0)
    best = penalised_loglik(theta, wins, 1.0)
    for i in range(4):
        for h in (1e-3, -1e-3):
            moved = theta.copy()
            moved[i] += h
            assert penalised_loglik(moved, wins, 1.0) < best  # a strict local maximum; concave: the global one
        e = np.zeros(4)
        e[i] = 1e-6
        slope = (penalised_loglik(theta + e, wins, 1.0) - penalised_loglik(theta - e, wins, 1.0)) / 2e-6
        assert abs(slope) < 1e-5
    # the batch gives each matrix its own fit
    batch = arena.fit_bradley_terry(np.stack([wins, wins.T, np.zeros((4, 4))]))
    assert np.allclose(batch[0], theta) and np.allclose(batch[1], arena.fit_bradley_terry(wins.T))
    assert np.allclose(batch[2], 0)  # no votes: everyone at the pool average


def test_two_models_follow_the_logistic_curve():
    """Between two models with many votes the fitted gap approaches log(wins / losses) (the prior fades)."""
    theta = arena.fit_bradley_terry(np.array([[0.0, 3000.0], [1000.0, 0.0]]))
    assert theta[0] - theta[1] == pytest.approx(math.log(3), rel=1e-3)
    ratings = arena.to_ratings(theta)
    assert ratings.mean() == pytest.approx(1000) and arena.expected_score(*ratings) == pytest.approx(0.75, rel=1e-3)


def test_the_prior_keeps_an_undefeated_model_finite():
    votes = [("champ", other, "a") for other in ("x", "y", "z") for _ in range(200)]
    votes += [("x", "y", "a")] * 5 + [("y", "z", "tie")] * 5
    board = arena.leaderboard(votes, n_boot=100, seed=1)
    assert board.models[0] == "champ"
    assert np.isfinite(board.ratings).all() and np.isfinite(board.lower).all() and np.isfinite(board.upper).all()
    assert board.ratings[0] < 1000 + 3000  # finite, and not absurdly far: ~log(200) on the logit scale
    assert board.ratings.mean() == pytest.approx(1000)
    with pytest.raises(ArenaError, match="prior"):
        arena.fit_bradley_terry(np.zeros((2, 2)), prior=0)


def test_rank_order_is_recovered_from_2000_votes():
    votes = simulate(np.random.default_rng(0), TRUE_RATINGS, 2000)
    board = arena.leaderboard(votes, models=[f"m{i}" for i in range(5)], n_boot=200, seed=0)
    assert board.models == ["m0", "m1", "m2", "m3", "m4"]
    assert board.n_votes == 2000 and int(board.games.sum()) == 4000  # each vote counted once per side
    fitted = dict(zip(board.models, board.ratings))
    assert max(abs(fitted[f"m{i}"] - TRUE_RATINGS[i]) for i in range(5)) < 60
    assert (board.lower <= board.ratings).all() and (board.ratings <= board.upper).all()
    rows = board.rows()
    assert rows[0]["rank"] == 1 and sum(r["votes"] for r in rows) == 4000
    assert sum(r["wins"] for r in rows) == sum(r["losses"] for r in rows)


def test_95_percent_intervals_cover_the_true_strengths():
    """Over 20 seeded simulations of 2,000 votes, at least 85% of the true ratings fall inside the intervals."""
    inside = total = 0
    for sim in range(20):
        votes = simulate(np.random.default_rng(100 + sim), TRUE_RATINGS, 2000)
        board = arena.leaderboard(votes, models=[f"m{i}" for i in range(5)], n_boot=200, seed=sim)
        for name, lo, hi in zip(board.models, board.lower, board.upper):
            truth = TRUE_RATINGS[int(name[1:])]
            inside += lo <= truth <= hi
            total += 1
    assert inside / total >= 0.85, f"coverage {inside}/{total}"


def test_bootstrap_is_seeded():
    votes = simulate(np.random.default_rng(5), TRUE_RATINGS, 300)
    one = arena.leaderboard(votes, n_boot=50, seed=7)
    two = arena.leaderboard(votes, n_boot=50, seed=7)
    other = arena.leaderboard(votes, n_boot=50, seed=8)
    assert np.array_equal(one.lower, two.lower) and np.array_equal(one.upper, two.upper)
    assert not np.array_equal(one.lower, other.lower)


def test_win_rate_matrix_and_counts():
    votes = [("a", "b", "a")] * 3 + [("b", "a", "a")] + [("a", "b", "both_bad")] * 2 + [("b", "c", "tie")]
    board = arena.leaderboard(votes, models=["a", "b", "c", "d"], n_boot=20)
    i = {m: n for n, m in enumerate(board.models)}
    assert board.games[i["a"], i["b"]] == 6 and board.games[i["b"], i["c"]] == 1
    assert board.win_rate[i["a"], i["b"]] == pytest.approx((3 + 1) / 6)  # 3 wins, 2 half-wins, 1 loss
    assert board.win_rate[i["b"], i["a"]] == pytest.approx(2 / 6)
    assert math.isnan(board.win_rate[i["a"], i["c"]]) and math.isnan(board.win_rate[i["d"], i["a"]])
    row = {r["model"]: r for r in board.rows()}
    assert (row["a"]["wins"], row["a"]["losses"], row["a"]["ties"]) == (3, 1, 2)
    assert row["d"]["votes"] == 0 and row["c"]["ties"] == 1


@pytest.mark.parametrize("votes, message", [
    ([("a", "b", "A")], "not one of"),
    ([("a", "a", "tie")], "itself"),
    ([("a", "b")], "expected"),
])
def test_bad_votes_are_named(votes, message):
    with pytest.raises(ArenaError, match=message):
        arena.leaderboard(votes)


def test_pairing_favours_few_votes_and_close_ratings():
    rng = np.random.default_rng(0)
    games = np.array([[0, 500, 0], [500, 0, 500], [0, 500, 0]], dtype=float)
    # equal ratings: the pair that never met (0, 2) is favoured
    draws = [tuple(sorted(arena.choose_pair(games, np.full(3, 1000.0), rng))) for _ in range(3000)]
    assert draws.count((0, 2)) > 1.5 * draws.count((0, 1))
    # equal counts: the close pair is favoured over the distant ones
    ratings = np.array([1000.0, 1010.0, 1600.0])
    draws = [tuple(sorted(arena.choose_pair(np.full((3, 3), 50.0), ratings, rng))) for _ in range(3000)]
    assert draws.count((0, 1)) > 3 * draws.count((0, 2))
    sides = [arena.choose_pair(np.zeros((2, 2)), np.array([1000.0, 1000.0]), rng)[0] for _ in range(400)]
    assert 120 < sides.count(0) < 280  # which side a model gets is random
    with pytest.raises(ArenaError, match="two models"):
        arena.choose_pair(np.zeros((1, 1)), np.array([1000.0]), rng)
