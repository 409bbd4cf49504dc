"""Merge and weight-search jobs: combine finished adapters into a new one (``core.merge``), as a job with its
parents recorded.

``submit_merge`` checks the parents (each one the actor may read, finished, with its adapter here, of a
family that merges, compatible with the others: ``core.merge.estimate`` reads their saved factors, never
merges) and queues a ``merge`` job; its child calls ``build_merge``, which writes the result where a
training job writes its adapter (``<out_dir>/adapter``), so chat, evaluation, comparison and exports
take it as they take a trained one (``ADAPTER_KINDS``). The parents are recorded in the job's
``info["parents"]`` with the merge settings (no schema change). ``adapter_norms`` gives the heat map of
any adapter job from its files. ``submit_weight_search`` queues a ``weight-search`` job: the same checks,
then its child scores mixing weights (``core.weight_search``) and writes the best mixture as its adapter.
Part of the service API (``JobService`` inherits these methods).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .access import ServiceBase
from .errors import JobError, row_id
from .schema import ACTIVE

# The kinds of job whose output is an adapter (<out_dir>/adapter): chat, evaluate, export, merge, arena take them.
ADAPTER_KINDS = ("train", "merge", "weight-search")
MERGE_KINDS = ("merge", "weight-search")  # the kinds whose adapter is a merge of parents (info["parents"])


class MergesAPI(ServiceBase):
    """Mixin of ``JobService``: needs ``get``, ``_insert``, ``check_files_here`` and ``submit_evaluation``."""

    def _adapter_dir(self, job: dict[str, Any]) -> Path:
        """The adapter directory of an adapter job, or ``JobError`` saying why it has none here."""
        if job["kind"] not in ADAPTER_KINDS:
            raise JobError(f"job {job['id']} is an {job['kind']} job; only training and merge jobs have adapters")
        adapter = Path(job["out_dir"]) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            self.check_files_here(job["id"])
            raise JobError(f"job {job['id']} has no adapter yet (status {job['status']})")
        return adapter

    def _merge_inputs(self, parent_ids: Iterable[Any], settings: Any) -> tuple[list[dict], list[Path], Any]:
        """The parent jobs (each checked as this actor), their adapter directories and the parsed settings."""
        from core.fields import ConfigError
        from core.merge import MergeSettings

        if isinstance(settings, dict):
            fields = set(MergeSettings.__dataclass_fields__)
            unknown = sorted(set(settings) - fields)
            if unknown:
                raise ConfigError(unknown[0], f"unknown merge setting; known: {', '.join(fields)}")
            settings = MergeSettings(**settings)
        elif not isinstance(settings, MergeSettings):
            raise ConfigError("settings", f"expected MergeSettings or a dict, not {type(settings).__name__}")
        ids = [row_id(i) for i in parent_ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("adapters", "each adapter may be chosen once (give it a larger weight instead)")
        jobs = [self.get(i) for i in ids]  # JobNotFound for a job this actor may not read
        for job in jobs:
            if job["status"] in ACTIVE:
                raise JobError(f"job {job['id']} is still {job['status']}: merge finished adapters only")
        return jobs, [self._adapter_dir(j) for j in jobs], settings

    def plan_merge(self, parent_ids: Iterable[Any], settings: Any) -> dict[str, Any]:
        """What a merge would make (rank, parameters, bytes), after every check ``submit_merge`` runs;
        reads the parents' saved factors only (nothing is merged here)."""
        from core.merge import estimate

        jobs, dirs, settings = self._merge_inputs(parent_ids, settings)
        return estimate(dirs, settings, names=[f"job {j['id']}" for j in jobs])

    def submit_merge(self, parent_ids: Iterable[Any], settings: Any, *, name: str | None = None,
                     benchmarks: Iterable[str] = (), evaluate_parents: bool = False) -> int:
        """Queue a merge of the adapters of ``parent_ids`` (``core.merge.MergeSettings`` or its dict);
        return the job id. ``benchmarks``: the merge job evaluates its result on these afterwards (as a
        training job does); with ``evaluate_parents`` each parent lacking an evaluation on one of them
        gets an evaluate job too, so the accuracy matrix shows the merge next to its parents.

        Raises ``ConfigError`` (bad settings, incompatible parents, naming the job and why), ``JobError``
        (a parent unfinished or without an adapter) or ``JobNotFound`` (a job this actor may not read).
        """
        from core.merge import MERGE_METHODS

        jobs, dirs, settings = self._merge_inputs(parent_ids, settings)
        spec, plan = self._merge_spec(jobs, dirs, settings, list(benchmarks))
        missing = self._missing_evaluations(jobs, spec.eval.benchmarks, spec.eval.protocol) if evaluate_parents else []
        self._check_quota(new_jobs=1 + len(missing))
        label = name or (f"merge {settings.method} of " + ", ".join(f"#{j['id']}" for j in jobs))
        spec.name = label[:200]
        info = {"parents": [j["id"] for j in jobs], "merge": settings.to_dict(), "plan": plan,
                "method_label": MERGE_METHODS[settings.method]}
        job_id = self._insert(spec, "merge", name=label, info=info)
        for parent_id, names in missing:  # scored as the merge will be, so the matrix compares like with like
            self.submit_evaluation(names, job_id=parent_id, settings=spec.eval)
        return job_id

    def _merge_spec(self, jobs: list[dict], dirs: list[Path], settings: Any, benchmarks: list[str],
                    eval_settings: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """The spec of a job making a merge of ``jobs`` (the first parent's, with the result's adapter) and
        the merge's plan; ``ConfigError`` for incompatible parents or unknown benchmarks."""
        from core.config import EvalSettings, JobSpec
        from core.fields import ConfigError
        from core.merge import estimate, result_config, result_rank

        plan = estimate(dirs, settings, names=[f"job {j['id']}" for j in jobs])
        spec = JobSpec.from_dict(jobs[0]["spec"])
        adapters = [json.loads((d / "adapter_config.json").read_text())["adapter"] for d in dirs]
        spec.adapter = result_config(adapters, result_rank(adapters, settings))
        spec.train.devices = 1
        if eval_settings is not None:
            try:
                spec.eval = EvalSettings.from_dict(eval_settings)
            except ConfigError as err:
                raise err.within("eval") from None
        spec.eval.benchmarks = benchmarks
        spec.validate()
        self._check_benchmarks(spec)
        return spec, plan

    def submit_weight_search(self, parent_ids: Iterable[Any], settings: Any, search: Any, benchmark: str, *,
                             eval_settings: dict[str, Any] | None = None, name: str | None = None) -> int:
        """Queue a search of the mixing weights of a merge of ``parent_ids`` (``settings``: the merge method
        and its other settings, ``MergeSettings`` or its dict; its weights are the first point tried);
        return the job id. ``search``: ``core.weight_search.SearchSettings`` or its dict (budget, range,
        seed). Each point is scored by its accuracy on ``benchmark`` (a registry name, ``builtin:math``
        or a part of it, or a file of a few labelled examples), on the slice ``eval_settings`` chooses
        (``limit``, ``sample_seed``, ``max_new_tokens``, ``batch_size``). The best mixture becomes the
        job's adapter, like a merge's.

        Raises what ``submit_merge`` raises, and ``ConfigError`` for bad search settings (naming the field).
        """
        from core.fields import ConfigError
        from core.merge import MERGE_METHODS
        from core.weight_search import SearchSettings

        jobs, dirs, settings = self._merge_inputs(parent_ids, settings)
        if isinstance(search, dict):
            known = set(SearchSettings.__dataclass_fields__)
            unknown = sorted(set(search) - known)
            if unknown:
                raise ConfigError(f"search.{unknown[0]}", f"unknown search setting; known: {', '.join(known)}")
            search = SearchSettings(**search)
        elif not isinstance(search, SearchSettings):
            raise ConfigError("search", f"expected SearchSettings or a dict, not {type(search).__name__}")
        try:
            search.validate()
        except ConfigError as err:
            raise err.within("search") from None
        if not isinstance(benchmark, str) or not benchmark.strip():
            raise ConfigError("benchmark", "name the benchmark or labelled examples each point is scored on")
        spec, plan = self._merge_spec(jobs, dirs, settings, [benchmark.strip()], eval_settings)
        self._check_quota(new_jobs=1)
        label = name or (f"weight search {settings.method} of " + ", ".join(f"#{j['id']}" for j in jobs))
        spec.name = label[:200]
        info = {"parents": [j["id"] for j in jobs], "merge": settings.to_dict(), "search": search.to_dict(),
                "plan": plan, "method_label": MERGE_METHODS[settings.method]}
        return self._insert(spec, "weight-search", name=label, info=info)

    def weight_search_inputs(self, job_id: int) -> tuple[list[Any], Any, Any]:
        """What a weight-search job's child searches: the parents read (``core.merge.read_parents``), the
        merge settings and the search settings."""
        from core.merge import MergeSettings, read_parents
        from core.weight_search import SearchSettings

        self._require_system("running a weight search")
        job = self.get(job_id)
        info = job.get("info") or {}
        parents = [self.get(i) for i in info.get("parents") or []]
        dirs = [self._adapter_dir(p) for p in parents]
        return (read_parents(dirs, names=[f"job {p['id']}" for p in parents]), MergeSettings(**info["merge"]),
                SearchSettings(**info["search"]))

    def _missing_evaluations(self, jobs: list[dict], benchmarks: list[str],
                             protocol: str) -> list[tuple[int, list[str]]]:
        """(parent id, the benchmarks it has no evaluation on under ``protocol``) for each parent lacking one."""
        out = []
        for job in jobs:
            done = {e["benchmark"] for e in self.list_evaluations(job_id=job["id"], protocol=protocol)}
            todo = [b for b in benchmarks if b not in done]
            if todo:
                out.append((job["id"], todo))
        return out

    def build_merge(self, job_id: int) -> dict[str, Any]:
        """Run the merge of a merge job (its child calls this): write ``<out_dir>/adapter`` and return
        ``core.merge.MergeResult`` as a dict."""
        from core.merge import MergeSettings, merge_adapters

        self._require_system("running a merge")
        job = self.get(job_id)
        info = job.get("info") or {}
        parents = [self.get(i) for i in info.get("parents") or []]
        dirs = [self._adapter_dir(p) for p in parents]
        out = Path(job["out_dir"]) / "adapter"
        result = merge_adapters(dirs, out, MergeSettings(**info["merge"]), names=[f"job {p['id']}" for p in parents])
        return result.to_dict()

    def adapter_norms(self, job_id: int) -> dict[str, Any]:
        """``||ΔW||`` per layer and module of an adapter job's adapter (``core.merge.delta_norms``), from its
        files: what the Merge tab's heat maps draw."""
        from core.merge import delta_norms

        return delta_norms(self._adapter_dir(self.get(job_id)))

    def merge_report(self, job_id: int) -> dict[str, Any] | None:
        """The report a finished merge job wrote (rank, parameters, retained energy overall and per
        module), or None before it has."""
        from core.merge import REPORT_FILE

        job = self.get(job_id)
        if job["kind"] not in MERGE_KINDS:
            raise JobError(f"job {job['id']} is an {job['kind']} job, not a merge")
        path = Path(job["out_dir"]) / "adapter" / REPORT_FILE
        return json.loads(path.read_text()) if path.is_file() else None
