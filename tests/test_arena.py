"""The blind arena: the Bradley-Terry leaderboard on simulated votes (seeded), the votes' storage and the
service's checks on SQLite and PostgreSQL, and the Arena tab's handlers generating with the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

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


# ------------------------------------------------------------------------------- storage, service

from core.config import DEFAULT_MODEL  # noqa: E402
from core.deployment import LOCAL_USER, Actor, Deployment  # noqa: E402
from jobs import arena as arena_api  # noqa: E402
from jobs import db as jobs_db  # noqa: E402
from jobs.errors import JobError, JobNotFound, QuotaError  # noqa: E402
from jobs.schema import ArenaVote  # noqa: E402
from jobs.service import JobService  # noqa: E402
from tests.test_jobs_support import make_service, tiny_spec  # noqa: E402

ALICE, BOB, ROOT = Actor("anon:alice0000000000"), Actor("anon:bob000000000000"), Actor("hf:root", admin=True)
QUICK = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def two_tiny(tiny_model_dir, tmp_path_factory):
    """Two base models: the tiny checkpoint and a copy in another folder (two keys, two contestants)."""
    import shutil

    copy = tmp_path_factory.mktemp("tiny-copy") / "tiny-b"
    shutil.copytree(tiny_model_dir, copy)
    return [f"base:{tiny_model_dir}", f"base:{copy}"]


@pytest.fixture
def public_db(db_url, tmp_path):
    svc = JobService(db_url, home=tmp_path / "home", deployment=Deployment.for_mode("public"))
    yield svc
    svc.close()


def finished_job(service: JobService, owner: JobService, model_dir, data) -> int:
    """A succeeded training job of ``owner`` with an adapter file on disk (made without training)."""
    spec = tiny_spec(model_dir, data)
    spec.model.name = DEFAULT_MODEL
    spec.data.source = "builtin:math"
    job_id = owner.submit(spec)
    adapter = Path(service.get(job_id)["out_dir"]) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    service.finish(job_id, "succeeded", only_if=None)
    return job_id


def answered(service: JobService, battle_id: int, a: str = "4", b: str = "5") -> None:
    """Answers written directly (for the checks that need no model)."""
    with service.db.write() as s:
        row = s.get(ArenaVote, battle_id)
        row.answer_a, row.answer_b = a, b


def test_migration_6_adds_the_arena_tables(db_url):
    import sqlalchemy as sa

    engine = jobs_db.make_engine(db_url)
    jobs_db.migrate(engine, jobs_db.MIGRATIONS[:5])
    with engine.begin() as conn:  # today's models stamped 5: take version 6's tables away
        conn.exec_driver_sql("DROP TABLE arena_votes")
        conn.exec_driver_sql("DROP TABLE arena_pools")
    engine.dispose()
    svc = JobService(db_url)
    try:
        with svc.db.engine.connect() as conn:
            assert jobs_db.schema_version(conn) == len(jobs_db.MIGRATIONS)  # 6, then the later ones
            assert {"arena_pools", "arena_votes"} <= set(sa.inspect(conn).get_table_names())
        assert svc.list_arena_pools() == []
    finally:
        svc.close()


def test_both_answers_stream_side_by_side(db_url, tmp_path, two_tiny, monkeypatch):
    """The two answers grow in turn (not A to its end, then B), and a side that fails is named by its
    letter only."""
    import core.generate

    service = make_service(tmp_path, db_url).scoped(LOCAL_USER)
    pool = service.create_arena_pool("tiny pair", two_tiny)
    monkeypatch.setattr(type(service), "_arena_chat_model", lambda self, key, template: key)
    monkeypatch.setattr(core.generate, "stream_answer",
                        lambda chat, prompt, settings, deployment: iter(["x", "xy", "xyz"]))
    battle = service.start_battle(pool, "What is 2 + 2?", settings=QUICK)
    steps = list(service.battle_answers(battle["id"]))
    assert steps[:4] == [("x", ""), ("x", "x"), ("xy", "x"), ("xy", "xy")] and steps[-1] == ("xyz", "xyz")

    battle_b = service.start_battle(pool, "What is 3 + 3?", settings=QUICK)
    with service.db.read() as s:
        key_b = s.get(ArenaVote, battle_b["id"]).model_b
    monkeypatch.setattr(core.generate, "stream_answer", lambda chat, prompt, settings, deployment:
                        (_ for _ in ()).throw(RuntimeError(f"{chat} broke")) if chat == key_b else iter(["x"]))
    with pytest.raises(JobError, match=r"^model B could not answer") as err:
        list(service.battle_answers(battle_b["id"]))
    assert key_b not in str(err.value)


def test_a_battle_is_generated_voted_revealed_and_exported(db_url, tmp_path, two_tiny):
    service = make_service(tmp_path, db_url).scoped(LOCAL_USER)
    pool = service.create_arena_pool("tiny pair", two_tiny)
    battle = service.start_battle(pool, "=HYPERLINK(\"x\") What is 2 + 2?", settings=QUICK)
    assert set(battle) == {"id", "pool_id", "prompt", "source", "settings", "answered", "vote"}  # models hidden
    with pytest.raises(JobError, match="no answers yet"):
        service.vote_battle(battle["id"], "a")
    steps = list(service.battle_answers(battle["id"]))
    assert len(steps) >= 2 and all(isinstance(x, str) for x in steps[-1])
    with pytest.raises(JobError, match="answered already"):
        next(service.battle_answers(battle["id"]))
    revealed = service.vote_battle(battle["id"], "a")
    assert {revealed["model_a"], revealed["model_b"]} == set(two_tiny)
    assert revealed["label_a"].startswith("base: ") and revealed["correct_a"] is None  # a typed prompt: no gold
    assert (revealed["answer_a"], revealed["answer_b"]) == steps[-1]
    with pytest.raises(JobError, match="has its vote already"):
        service.vote_battle(battle["id"], "b")
    [vote] = service.arena_votes(pool)
    assert vote["voter"] == "local" and vote["vote"] == "a" and vote["prompt"].startswith("=HYPERLINK")
    assert vote["max_new_tokens"] == 4 and vote["temperature"] == 0.0 and vote["voted_at"]
    board = service.arena_leaderboard(pool, n_boot=50)
    assert board["n_votes"] == 1 and board["rows"][0]["key"] == revealed["model_a"]
    assert board["rows"][0]["rating"] > 1000 > board["rows"][1]["rating"]
    import csv
    import io
    import json

    [row] = list(csv.DictReader(io.StringIO(service.arena_votes_csv(pool))))
    assert row["prompt"].startswith("'=HYPERLINK")  # a spreadsheet shows it, does not run it
    assert row["vote"] == "a" and row["model_a"] == revealed["model_a"] and row["voter"] == "local"
    [line] = [json.loads(x) for x in service.arena_votes_jsonl(pool).splitlines()]
    assert line["prompt"] == vote["prompt"] and line["answer_b"] == revealed["answer_b"]
    assert list(line) == list(arena_api.EXPORT_COLUMNS)
    service.close()


def test_a_benchmark_prompt_reveals_its_gold_answer(tmp_path, two_tiny):
    service = make_service(tmp_path).scoped(LOCAL_USER)
    pool = service.create_arena_pool("p", two_tiny)
    assert "builtin:math" in service.arena_benchmarks()
    battle = service.start_battle(pool, benchmark="builtin:math", settings=QUICK)
    assert battle["source"] == "builtin:math" and battle["prompt"] and "gold" not in battle
    answered(service, battle["id"], "The answer is 0.5", "nothing")
    revealed = service.vote_battle(battle["id"], "both_bad")
    assert revealed["gold"] is not None and revealed["correct_b"] is False
    with pytest.raises(JobError, match="unknown benchmark"):
        service.start_battle(pool, benchmark="/etc/passwd", settings=QUICK)
    service.close()


def test_pools_are_their_owners_unless_an_admin_shares_them(public_db, tiny_model_dir, data):
    alice, bob, root = (public_db.scoped(a) for a in (ALICE, BOB, ROOT))
    job = finished_job(public_db, alice, tiny_model_dir, data)
    models = [f"job:{job}", f"base:{DEFAULT_MODEL}"]
    with pytest.raises(JobNotFound):
        bob.create_arena_pool("steal", models)  # alice's job is not bob's to pit
    with pytest.raises(PermissionError, match="admin"):
        alice.create_arena_pool("mine", models, shared=True)
    pool = alice.create_arena_pool("mine", models)
    assert [p["id"] for p in alice.list_arena_pools()] == [pool] and bob.list_arena_pools() == []
    for action in (bob.get_arena_pool, bob.arena_votes, bob.arena_leaderboard, bob.arena_votes_csv,
                   bob.delete_arena_pool, lambda p: bob.start_battle(p, "hi", settings=QUICK)):
        with pytest.raises(JobNotFound, match=f"no arena pool {pool}"):
            action(pool)
    with pytest.raises(PermissionError):
        alice.share_arena_pool(pool)
    root.share_arena_pool(pool)
    assert [p["id"] for p in bob.list_arena_pools()] == [pool]
    battle = bob.start_battle(pool, "What is 1 + 1?", settings=QUICK)
    with pytest.raises(JobNotFound, match="no battle"):
        alice.vote_battle(battle["id"], "a")  # only the one who battled votes
    answered(public_db, battle["id"])
    bob.vote_battle(battle["id"], "tie")
    assert [v["voter"] for v in alice.arena_votes(pool)] == ["another voter"]  # other visitors stay anonymous
    assert [v["voter"] for v in bob.arena_votes(pool)] == [BOB.name] and root.arena_votes(pool)[0]["voter"] == BOB.name
    with pytest.raises(PermissionError, match="not yours"):
        bob.delete_arena_pool(pool)
    root.share_arena_pool(pool, False)
    with pytest.raises(JobNotFound):
        bob.vote_battle(battle["id"], "a")  # unshared: bob's battles there are closed too
    alice.delete_arena_pool(pool)
    assert root.list_arena_pools() == []


@pytest.mark.parametrize("pool_id", ["1 OR 1=1", -1, True, 10**30, None, 1.5, [1]])
def test_bad_pool_ids_are_not_found(public_db, pool_id):
    with pytest.raises(JobNotFound):
        public_db.scoped(ALICE).start_battle(pool_id, "hi", settings=QUICK)


def test_what_a_visitor_sends_is_checked(public_db, tiny_model_dir, data):
    alice = public_db.scoped(ALICE)
    job = finished_job(public_db, alice, tiny_model_dir, data)
    for models, message in [(["job:1"], "2 to"), ("job:1,job:2", "list of model keys"),
                            ([f"job:{job}", "job:abc"], "unknown model"), ([f"job:{job}", "base:/etc"], "models"),
                            ([f"job:{job}", "base:" + "x" * 700], "too long"),
                            ([f"base:m{i}" for i in range(20)], "2 to 16")]:
        with pytest.raises((JobError, ValueError), match=message):
            alice.create_arena_pool("p", models)
    pool = alice.create_arena_pool("p", [f"job:{job}", f"base:{DEFAULT_MODEL}"])
    with pytest.raises(JobError, match="at most 4,000"):
        alice.start_battle(pool, "x" * 4001, settings=QUICK)
    with pytest.raises(JobError, match="type a prompt"):
        alice.start_battle(pool, "   ", settings=QUICK)
    for settings in ({"temperature": float("nan")}, {"max_new_tokens": "9"}, {"top_p": 0}):
        with pytest.raises(JobError):
            alice.start_battle(pool, "hi", settings=settings)
    big = alice.start_battle(pool, "hi", settings={"max_new_tokens": 100_000})
    assert big["settings"]["max_new_tokens"] == public_db.deployment.limits.chat_new_tokens  # chat's cap
    answered(public_db, big["id"])
    for vote in ("A", "", None, ["a"], "a; drop table"):
        with pytest.raises(JobError, match="vote must be one of"):
            alice.vote_battle(big["id"], vote)
    with public_db.scoped(ALICE).generation_slot():  # one answer at a time per visitor, as in chat
        other = alice.start_battle(pool, "hi", settings=QUICK)
        with pytest.raises(QuotaError, match="one answer at a time"):
            next(alice.battle_answers(other["id"]))


def test_battles_are_rate_limited_per_visitor(public_db, tiny_model_dir, data):
    assert public_db.deployment.limits.arena_battles == 30
    public_db.deployment = public_db.deployment.with_limits(arena_battles=3)
    alice, bob, root = (public_db.scoped(a) for a in (ALICE, BOB, ROOT))
    job = finished_job(public_db, alice, tiny_model_dir, data)
    pool = alice.create_arena_pool("p", [f"job:{job}", f"base:{DEFAULT_MODEL}"])
    root.share_arena_pool(pool)
    for _ in range(3):
        alice.start_battle(pool, "hi", settings=QUICK)
    with pytest.raises(QuotaError, match="3 battles in the last 10 minutes"):
        alice.start_battle(pool, "hi", settings=QUICK)
    bob.start_battle(pool, "hi", settings=QUICK)  # per visitor: bob is not held back by alice
    for _ in range(4):
        root.start_battle(pool, "hi", settings=QUICK)  # admins are not limited


# ------------------------------------------------------------------------------------------- the tab

def test_the_tab_battles_votes_and_moves_the_leaderboard(tmp_path, two_tiny):
    import gradio as gr

    from app import arena_tab, ui
    from app.auth import ScopedService

    base = make_service(tmp_path)
    service = ScopedService(base)
    with gr.Blocks():
        tab = arena_tab.build_arena_tab(service)
    assert len(tab.vote_buttons) == 4
    keys = {v for _, v in arena_tab.model_choices(service)}
    assert f"base:{DEFAULT_MODEL}" in keys
    pool_update, message = arena_tab.create_pool(service, "tiny", two_tiny, False)
    pool = pool_update["value"]
    assert message == f"Pool {pool} created." and pool_update["choices"][0][1] == pool
    assert arena_tab.create_pool(service, "one", two_tiny[:1], False)[1].startswith("a pool needs 2")
    pools, models, benchmarks = arena_tab.refresh(service, None, [two_tiny[0], "base:gone"])
    assert pools["value"] == pool and models["value"] == [] and "builtin:math" in benchmarks["choices"]
    table, _, _, summary = arena_tab.leaderboard(service, pool)
    assert [row[4] for row in table["value"]["data"]] == [0, 0] and summary.startswith("0 votes")

    steps = list(arena_tab.battle(service, pool, arena_tab.TYPED, "What is 2 + 2?", None, 4, 0.0, 1.0))
    battle_id, shown = steps[0][0], steps[0][1]
    assert isinstance(battle_id, int) and "What is 2 + 2?" in shown
    assert all(not u["interactive"] for step in steps[:-1] for u in step[4:8])  # no vote before both answers
    final = steps[-1]
    assert final[0] == battle_id and all(u["interactive"] for u in final[4:8])
    assert not any(key in str(step) for step in steps for key in two_tiny)  # nothing names the models
    cleared, reveal, *buttons = arena_tab.cast_vote(service, battle_id, "b")
    assert cleared is None and "**A** was base: " in reveal and "you preferred **B**" in reveal
    assert all(not b["interactive"] for b in buttons)
    again = arena_tab.cast_vote(service, battle_id, "a")
    assert again[0] == battle_id and "vote already" in again[1]
    table, ratings, win_rate, summary = arena_tab.leaderboard(service, pool)
    assert summary.startswith("1 votes") and [row[4] for row in table["value"]["data"]] == [1, 1]
    assert table["value"]["data"][0][2] > 1000 > table["value"]["data"][1][2]
    assert len(ratings.data) == 1 and ratings.data[0].error_y.array is not None and len(win_rate.data) == 1
    path = arena_tab.export(service, pool, "jsonl")["value"]
    assert Path(path).name == f"arena-pool-{pool}-votes.jsonl" and '"vote": "b"' in Path(path).read_text()
    assert Path(arena_tab.export(service, pool, "csv")["value"]).read_text().startswith("id,pool_id")

    # a benchmark prompt: the gold answer comes with the reveal
    steps = list(arena_tab.battle(service, pool, arena_tab.FROM_BENCHMARK, "", "builtin:math", 4, 0.0, 1.0))
    assert "builtin:math" in steps[0][1]
    assert "Correct answer: **" in arena_tab.cast_vote(service, steps[-1][0], "tie")[1]
    # refusals are messages, not exceptions
    for args in [(None, arena_tab.TYPED, "hi", None, 4, 0.0, 1.0), (pool, arena_tab.TYPED, "hi", None, "x", 0.0, 1.0),
                 (pool, arena_tab.TYPED, "x" * 5000, None, 4, 0.0, 1.0), (999, arena_tab.TYPED, "hi", None, 4, 0, 1)]:
        assert [s[0] for s in arena_tab.battle(service, *args)] == [None]
    assert arena_tab.cast_vote(service, None, "a")[0] is None
    assert arena_tab.delete_pool(service, None)[1] == ""  # not confirmed: nothing happens
    assert service.get_arena_pool(pool)["name"] == "tiny"
    pools, message = arena_tab.delete_pool(service, pool)
    assert message == "Pool 'tiny' and its votes deleted." and pools["value"] is None and pools["choices"] == []
    assert arena_tab.delete_pool(service, pool)[1] == f"no arena pool {pool}"  # gone: a message, not a crash
    demo = ui.build_demo(base)  # the page registers the tab
    assert "arena" in demo.workbench
    base.close()
