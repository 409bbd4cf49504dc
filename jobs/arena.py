"""The blind arena's part of the service API: pools, battles, votes, the leaderboard and vote exports.

A *pool* is a set of models (``job:<id>`` adapters of finished training or merge jobs, ``base:<name>``
base models) that its owner picked. A *battle* is one row of ``arena_votes``: the server draws two
models of the pool (``core.arena.choose_pair``: pairs with few votes or close ratings first), in random
sides, generates both answers itself (``battle_answers``) and records them; the voter then votes once
(``vote_battle``), and only then learns which model was which and, for a benchmark prompt, the correct
answer. Nothing a caller sends can name the models, the answers or the gold answer of a battle, so
votes cannot be forged for a chosen pair.

Who may do what (checked here, whatever the UI shows):
- a pool is used (battles, leaderboard, exports) by its owner, by admins, and by everyone once an admin
  has shared it; only admins share; a pool's models are checked against its creator's rights when
  it is made (their own finished jobs; base models the deployment allows);
- a battle is voted on by the one who started it, once, after both answers are in;
- generation obeys chat's limits (``core.generate`` caps new tokens at ``limits.chat_new_tokens`` and
  keeps ``limits.chat_models_resident`` models; ``generation_slot``: one answer at a time per visitor in
  public mode), and a prompt is at most ``limits.prompt_chars``, as a chat question;
- battles (hence votes) are rate-limited per voter: ``limits.arena_battles`` per 10 minutes (30 in
  public mode, 300 in team mode, none in local mode; admins are not limited).

Part of the service API (``JobService`` inherits these methods); needs ``get``, ``files`` and
``resolve_model`` of the other mixins, and ``generation_slot`` (``uploads``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import sqlalchemy as sa

from core import arena

from .access import ServiceBase
from .compare import parse_model_key
from .errors import JobError, JobNotFound, QuotaError, iso, row_id
from .merges import ADAPTER_KINDS
from .schema import FINISHED, ArenaPool, ArenaVote, Job, utcnow

log = logging.getLogger("workbench.arena")

MAX_POOL_MODELS = 16
MAX_POOLS_PER_OWNER = 20          # non-admins
MAX_KEY_CHARS = 600               # arena_votes.model_a / model_b
BATTLE_WINDOW_S = 600.0  # the window of ``Limits.arena_battles``
EXPORT_COLUMNS = ("id", "pool_id", "created_at", "voted_at", "voter", "prompt", "source", "example", "gold",
                  "model_a", "model_b", "answer_a", "answer_b", "vote", "max_new_tokens", "temperature", "top_p")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def pool_dict(pool: ArenaPool) -> dict[str, Any]:
    return {"id": pool.id, "name": pool.name, "owner": pool.owner, "models": list(pool.models or []),
            "shared": bool(pool.shared), "created_at": iso(pool.created_at)}


def battle_dict(row: ArenaVote) -> dict[str, Any]:
    """A battle as its voter sees it before voting: no model ids, no gold answer."""
    return {"id": row.id, "pool_id": row.pool_id, "prompt": row.prompt, "source": row.source,
            "settings": dict(row.settings or {}), "answered": row.answer_a is not None and row.answer_b is not None,
            "vote": row.vote}


def vote_dict(row: ArenaVote) -> dict[str, Any]:
    settings = row.settings or {}
    return {"id": row.id, "pool_id": row.pool_id, "created_at": iso(row.created_at), "voted_at": iso(row.voted_at),
            "voter": row.voter, "prompt": row.prompt, "source": row.source, "example": row.example,
            "gold": row.gold, "model_a": row.model_a, "model_b": row.model_b, "answer_a": row.answer_a,
            "answer_b": row.answer_b, "vote": row.vote, "max_new_tokens": settings.get("max_new_tokens"),
            "temperature": settings.get("temperature"), "top_p": settings.get("top_p")}


def check_settings(settings: Any) -> dict[str, Any]:
    """Generation settings of a battle from a dict (or ``GenerationSettings``), checked like chat's."""
    values = settings if isinstance(settings, dict) else dict(getattr(settings, "__dict__", {}) or {})
    out: dict[str, Any] = {}
    for name, default in (("max_new_tokens", 192), ("temperature", 0.0), ("top_p", 1.0)):
        value = values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JobError(f"{name}: expected a number (got {str(value)[:40]!r})")
        out[name] = value
    if not 1 <= out["max_new_tokens"] <= 100_000 or not 0 <= out["temperature"] <= 5 or not 0 < out["top_p"] <= 1:
        raise JobError("max_new_tokens must be >= 1, temperature within 0-5 and top_p within (0, 1]")
    return {"max_new_tokens": int(out["max_new_tokens"]), "temperature": float(out["temperature"]),
            "top_p": float(out["top_p"])}


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (visitors write prompts; an admin opens the file)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


class ArenaAPI(ServiceBase):
    """Mixin of ``JobService``: pools, battles and votes of the blind arena (module docstring)."""

    # ---------------------------------------------------------------------------------------- pools
    def create_arena_pool(self, name: Any, models: Any, shared: bool = False) -> int:
        """A pool of ``models`` (at least two keys this actor may use); ``shared`` only by an admin."""
        name = (name if isinstance(name, str) else "").strip()[:100] or "pool"
        if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
            raise JobError("models: expected a list of model keys (job:<id> or base:<name>)")
        keys = list(dict.fromkeys(m.strip() for m in models if m.strip()))
        if not 2 <= len(keys) <= MAX_POOL_MODELS:
            raise JobError(f"a pool needs 2 to {MAX_POOL_MODELS} different models (got {len(keys)})")
        for key in keys:
            self._check_pool_model(key)
        if shared and not self.actor.admin:
            raise PermissionError("only an admin shares a pool with everyone")
        with self.db.write() as s:
            if not self.actor.admin:
                mine = s.scalar(sa.select(sa.func.count(ArenaPool.id)).where(ArenaPool.owner == self.owner)) or 0
                if mine >= MAX_POOLS_PER_OWNER:
                    raise QuotaError(f"you have {mine} arena pools; this workbench keeps {MAX_POOLS_PER_OWNER} "
                                     "per user: delete one first")
            pool = ArenaPool(name=name, owner=self.owner, models=keys, shared=bool(shared))
            s.add(pool)
            s.flush()
            return pool.id

    def _check_pool_model(self, key: str) -> None:
        """``key`` names a model this actor may put in a pool: a finished job of theirs with an adapter
        here, or a base model the deployment allows. Raises naming the key."""
        if len(key) > MAX_KEY_CHARS:
            raise JobError(f"model key too long ({len(key)} characters, at most {MAX_KEY_CHARS})")
        kind, ref = parse_model_key(key)
        if kind == "base":
            self.resolve_model(ref, field="models")
            return
        job = self.get(ref)  # JobNotFound when it is not theirs
        if job["kind"] not in ADAPTER_KINDS or job["status"] not in FINISHED:
            raise JobError(f"{key}: job {ref} is a {job['status']} {job['kind']} job; a pool takes finished "
                           f"{' or '.join(ADAPTER_KINDS)} jobs")
        if not self.files(ref)["adapter"]:
            raise JobError(f"{key}: job {ref} has no saved adapter")

    def share_arena_pool(self, pool_id: Any, shared: bool = True) -> None:
        """Share a pool with every visitor, or stop sharing it (admins only)."""
        if not self.actor.admin:
            raise PermissionError("only an admin shares a pool with everyone")
        with self.db.write() as s:
            self._pool(s, pool_id).shared = bool(shared)

    def list_arena_pools(self) -> list[dict[str, Any]]:
        """Pools this actor may use (their own and shared ones; an admin: all), newest first, with vote counts."""
        q = sa.select(ArenaPool).order_by(ArenaPool.id.desc())
        if not self.actor.admin:
            q = q.where(sa.or_(ArenaPool.owner == self.actor.name, ArenaPool.shared.is_(True)))
        counts = sa.select(ArenaVote.pool_id, sa.func.count(ArenaVote.id)).where(
            ArenaVote.vote.is_not(None)).group_by(ArenaVote.pool_id)
        with self.db.read() as s:
            votes = dict(s.execute(counts).all())
            return [{**pool_dict(p), "votes": int(votes.get(p.id, 0))} for p in s.scalars(q)]

    def get_arena_pool(self, pool_id: Any) -> dict[str, Any]:
        with self.db.read() as s:
            return pool_dict(self._pool(s, pool_id))

    def delete_arena_pool(self, pool_id: Any) -> None:
        """Delete a pool and its votes (its owner or an admin; sharing does not give the right)."""
        with self.db.write() as s:
            pool = self._pool(s, pool_id)
            if not self.may_see(pool.owner):
                raise PermissionError(f"pool {pool.id} is shared with you, not yours to delete")
            s.execute(sa.delete(ArenaVote).where(ArenaVote.pool_id == pool.id))
            s.delete(pool)

    def _pool(self, s: Any, pool_id: Any) -> ArenaPool:
        """The pool, if it exists and this actor may use it; ``JobNotFound`` otherwise (either way)."""
        pool = s.get(ArenaPool, row_id(pool_id, "arena pool"))
        if pool is None or not (pool.shared or self.may_see(pool.owner)):
            raise JobNotFound(pool_id, "arena pool")
        return pool

    # -------------------------------------------------------------------------------------- battles
    def arena_benchmarks(self) -> list[str]:
        """Benchmarks a battle's prompt may be drawn from: the built-in problems and those available here."""
        from core.benchmarks import list_benchmarks

        return [b["name"] for b in list_benchmarks() if b["available"]]

    def start_battle(self, pool_id: Any, prompt: Any = None, benchmark: Any = None,
                     settings: Any = None) -> dict[str, Any]:
        """Draw two models of the pool for ``prompt``, or for a random example of ``benchmark`` (one of
        ``arena_benchmarks``); return the battle as ``battle_dict`` shows it (models hidden)."""
        from core.generate import GenerationSettings, new_tokens

        checked = check_settings(settings or {})
        checked["max_new_tokens"] = new_tokens(GenerationSettings(**checked), self.deployment)  # chat's cap
        source = example = gold = None
        if benchmark not in (None, ""):
            source, example, prompt, gold = self._benchmark_prompt(benchmark)
        prompt = (prompt if isinstance(prompt, str) else "").strip()
        if not prompt:
            raise JobError("type a prompt or pick a benchmark to draw one from")
        if len(prompt) > self.deployment.limits.prompt_chars:
            raise JobError(f"the prompt is {len(prompt):,} characters long; the arena takes at most "
                           f"{self.deployment.limits.prompt_chars:,}")
        with self.db.read() as s:
            pool = self._pool(s, pool_id)
            pool_id, models = pool.id, [m for m in pool.models if self._still_there(s, m)]
            votes = s.execute(sa.select(ArenaVote.model_a, ArenaVote.model_b, ArenaVote.vote).where(
                ArenaVote.pool_id == pool_id, ArenaVote.vote.is_not(None))).all()
        if len(models) < 2:
            raise JobError(f"pool {pool_id} has fewer than two models left (their jobs were deleted)")
        self._check_battle_rate()
        board = arena.leaderboard([tuple(v) for v in votes if v[0] in models and v[1] in models],
                                  models=models, n_boot=1)
        i, j = arena.choose_pair(board.games, board.ratings, np.random.default_rng(secrets.randbits(64)))
        with self.db.write() as s:
            row = ArenaVote(pool_id=pool_id, voter=self.owner, prompt=prompt, source=source, example=example,
                            gold=gold, model_a=board.models[i], model_b=board.models[j], settings=checked)
            s.add(row)
            s.flush()
            return battle_dict(row)

    def _benchmark_prompt(self, benchmark: Any) -> tuple[str, int, str, str]:
        """(name, index, prompt, gold) of a random example of an allowed benchmark."""
        from core.benchmarks import load_benchmark

        if not isinstance(benchmark, str) or benchmark not in self.arena_benchmarks():
            raise JobError(f"unknown benchmark {str(benchmark)[:60]!r}: pick one of the list")
        examples = load_benchmark(benchmark, deployment=self.deployment).examples
        index = secrets.randbelow(len(examples))
        ex = examples[index]
        prompt = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
        return benchmark, index, prompt[:self.deployment.limits.prompt_chars], ex["answer"]

    @staticmethod
    def _still_there(s: Any, key: str) -> bool:
        kind, ref = parse_model_key(key)
        return kind == "base" or s.get(Job, ref) is not None

    def _check_battle_rate(self) -> None:
        most, window = self.deployment.limits.arena_battles, BATTLE_WINDOW_S
        if self.actor.admin or most <= 0:
            return
        since = utcnow() - dt.timedelta(seconds=window)
        with self.db.read() as s:
            recent = s.scalars(sa.select(ArenaVote.created_at).where(
                ArenaVote.voter == self.owner, ArenaVote.created_at >= since).order_by(ArenaVote.created_at)).all()
        if len(recent) >= most:
            wait = (recent[-most] - since).total_seconds()
            raise QuotaError(f"you started {len(recent)} battles in the last {window / 60:g} minutes; this "
                             f"workbench allows {most}: try again in {max(1, math.ceil(wait / 60))} minute(s)")

    def _battle(self, s: Any, battle_id: Any) -> ArenaVote:
        """The battle, if this actor started it (in a pool they may still use); ``JobNotFound`` otherwise."""
        row = s.get(ArenaVote, row_id(battle_id, "battle"))
        if row is None or row.voter != self.owner:
            raise JobNotFound(battle_id, "battle")
        self._pool(s, row.pool_id)
        return row

    def battle_answers(self, battle_id: Any) -> Iterator[tuple[str, str]]:
        """Generate both answers of a battle side by side (both generations run at once, each in its own
        thread, and are read in turn), yielding ``(answer_a, answer_b)`` as they grow; stored when both
        are complete. A model that fails is not named (that would unmask it)."""
        from core.generate import GenerationSettings, stream_answer

        with self.db.read() as s:
            row = self._battle(s, battle_id)
            if row.answer_a is not None or row.vote is not None:
                raise JobError(f"battle {row.id} was answered already: start a new one")
            battle_id, prompt, keys = row.id, row.prompt, (row.model_a, row.model_b)
            settings = GenerationSettings(**row.settings)
        template = self._shared_template(keys)
        answers = ["", ""]
        with self.generation_slot():
            streams = [self._side(side, key, battle_id,
                                  lambda key=key: stream_answer(self._arena_chat_model(key, template), prompt,
                                                                settings, self.deployment))
                       for side, key in enumerate(keys)]
            live = [0, 1]
            while live:
                for side in list(live):
                    try:
                        answers[side] = next(streams[side])
                    except StopIteration:
                        live.remove(side)
                        continue
                    yield answers[0], answers[1]
        with self.db.write() as s:
            row = self._battle(s, battle_id)
            row.answer_a, row.answer_b = answers
        yield answers[0], answers[1]

    @staticmethod
    def _side(side: int, key: str, battle_id: int, start: Callable[[], Iterator[str]]) -> Iterator[str]:
        """One side's growing answer; any failure (loading or generating) becomes an error that names the
        side, not the model (the model's name is logged)."""
        try:
            yield from start()
        except Exception:  # the message could name the model: logged here, not shown
            log.exception("arena battle %s: model %s failed", battle_id, key)
            raise JobError(f"model {'AB'[side]} could not answer (the server's log says why); "
                           "start another battle") from None

    def _shared_template(self, keys: tuple[str, str]) -> str | None:
        """The prompt template of the first adapter of the pair: a base model then gets the same prompt."""
        for key in keys:
            kind, ref = parse_model_key(key)
            if kind == "job":
                with self.db.read() as s:
                    job = s.get(Job, ref)
                    spec = job.spec if job is not None else None
                if spec is not None:
                    return ((spec or {}).get("data") or {}).get("template", "alpaca")
        return None

    def _arena_chat_model(self, key: str, template: str | None) -> Any:
        """The ``ChatModel`` of a pool's model. The pool was checked when it was made and again now
        (``_battle``), so an adapter of its creator's job loads for whoever may use the pool."""
        from core.config import ModelSettings
        from core.generate import adapter_chat_model, base_chat_model

        kind, ref = parse_model_key(key)
        if kind == "job":
            with self.db.read() as s:
                job = s.get(Job, ref)
                out_dir, name = (job.out_dir, job.name) if job is not None else (None, "")
            adapter = Path(out_dir or "") / "adapter"
            if not out_dir or not (adapter / "adapter_config.json").is_file():
                raise JobError(f"job {ref} has no saved adapter here")
            return adapter_chat_model(adapter, name=f"#{ref} {name}", deployment=self.deployment)
        chat = base_chat_model(ModelSettings(name=self.resolve_model(ref)), template=template or "alpaca",
                               deployment=self.deployment)
        if template is None and getattr(chat.tokenizer, "chat_template", None):
            chat.template = "chat"
        return chat

    def vote_battle(self, battle_id: Any, vote: Any) -> dict[str, Any]:
        """Record the vote (``core.arena.VOTES``) and reveal the battle: both models (keys and labels),
        and for a benchmark prompt the correct answer and whether each answer has it."""
        if vote not in arena.VOTES:
            raise JobError(f"vote must be one of {', '.join(arena.VOTES)} (got {str(vote)[:20]!r})")
        with self.db.write() as s:
            row = self._battle(s, battle_id)
            if row.vote is not None:
                raise JobError(f"battle {row.id} has its vote already")
            if row.answer_a is None or row.answer_b is None:
                raise JobError(f"battle {row.id} has no answers yet: wait for both before voting")
            row.vote, row.voted_at = vote, utcnow()
            result = vote_dict(row)
        labels = self._labels([result["model_a"], result["model_b"]])
        result.update(label_a=labels[result["model_a"]], label_b=labels[result["model_b"]],
                      correct_a=None, correct_b=None)
        if result["gold"] is not None and result["source"]:
            from core.benchmarks import is_correct

            result["correct_a"] = is_correct(result["source"], result["answer_a"], result["gold"])
            result["correct_b"] = is_correct(result["source"], result["answer_b"], result["gold"])
        return result

    def _labels(self, keys: list[str]) -> dict[str, str]:
        """How the arena names models once revealed: ``#<id> <job name>`` or ``base: <name>``."""
        out = {}
        with self.db.read() as s:
            for key in keys:
                kind, ref = parse_model_key(key)
                if kind == "base":
                    out[key] = f"base: {Path(ref).name if Path(ref).is_absolute() else ref}"
                else:
                    job = s.get(Job, ref)
                    out[key] = f"#{ref} {job.name}" if job is not None else f"#{ref} (deleted job)"
        return out

    # ------------------------------------------------------------------------------ results, exports
    def arena_votes(self, pool_id: Any) -> list[dict[str, Any]]:
        """The pool's votes, oldest first; voters other than the caller are hidden from non-admins."""
        with self.db.read() as s:
            pool_id = self._pool(s, pool_id).id
            rows = [vote_dict(r) for r in s.scalars(sa.select(ArenaVote).where(
                ArenaVote.pool_id == pool_id, ArenaVote.vote.is_not(None)).order_by(ArenaVote.id))]
        if not self.actor.admin:
            for r in rows:
                r["voter"] = r["voter"] if r["voter"] == self.owner else "another voter"
        return rows

    def arena_leaderboard(self, pool_id: Any, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
        """The pool's Bradley-Terry ratings with bootstrap intervals, win rates and counts (``core.arena``)."""
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not 1 <= n_boot <= 2000:
            raise JobError(f"n_boot must be a whole number within 1-2000 (got {n_boot!r})")
        pool = self.get_arena_pool(pool_id)
        votes = [(v["model_a"], v["model_b"], v["vote"]) for v in self.arena_votes(pool["id"])]
        board = arena.leaderboard(votes, models=pool["models"], n_boot=n_boot, seed=seed)
        labels = self._labels(board.models)
        rows = [{**r, "key": r["model"], "label": labels[r["model"]]} for r in board.rows()]
        return {"pool": pool, "rows": rows, "labels": [labels[m] for m in board.models],
                "games": board.games.astype(int).tolist(),
                "win_rate": [[None if math.isnan(x) else float(x) for x in row] for row in board.win_rate],
                "n_votes": board.n_votes, "level": board.level, "bootstrap": board.bootstrap}

    def arena_votes_csv(self, pool_id: Any) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        for v in self.arena_votes(pool_id):
            writer.writerow([_csv_cell(v[c]) for c in EXPORT_COLUMNS])
        return out.getvalue()

    def arena_votes_jsonl(self, pool_id: Any) -> str:
        return "".join(json.dumps({c: v[c] for c in EXPORT_COLUMNS}, ensure_ascii=False) + "\n"
                       for v in self.arena_votes(pool_id))

