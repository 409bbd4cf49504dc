"""What each kind of job does, run inside its child process (``jobs.run``), by ``RUNNERS[kind]``.

Each runner takes ``(service, job, rec, stop, budget)`` and returns the final status and the job's
values to write; it reports through ``rec`` (``jobs.run.Recorder``) and stops at its next step when
``stop``, ``rec.cancel_requested()`` or ``budget`` says so.

- ``train``: ``core.train.train`` with callbacks that record metric points and progress; a cancel (or
  SIGTERM/SIGINT) stops the run at the next step with the adapter and a checkpoint saved: status
  ``cancelled`` (``interrupted`` for a signal). Benchmarks named in ``spec.eval.benchmarks`` are run on
  the adapter afterwards.
- ``evaluate``: ``core.evaluate`` on the base model, with the adapter of ``target_job_id`` if set;
  each benchmark's result and per-example predictions go to ``evaluations``/``eval_samples``.
- ``export``: the zip of ``target_job_id``'s adapter in the form ``info["artifact"]`` names.
- ``merge``: the parents' adapters merged into ``<out_dir>/adapter``, then evaluated like a training job's.
- ``weight-search``: mixing weights of a merge scored on a benchmark slice, the best written as the adapter.

Two environment variables exist for tests and demos: ``WORKBENCH_TEST_STEP_DELAY`` (seconds to sleep
after each training step) and ``WORKBENCH_TEST_FAIL_AT_STEP`` (raise at that step).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import core
from core.callbacks import CallbackList, TrainCallbacks
from core.config import JobSpec
from core.metrics import eval_record, finite, step_record
from core.trackers import TrackerRun, Trackers, job_trackers, open_trackers

from .lmeval_jobs import run_lmeval
from .run import Budget, Cancelled, Recorder, StopFlag
from .service import JobService

STEP_DELAY_ENV = "WORKBENCH_TEST_STEP_DELAY"
FAIL_AT_ENV = "WORKBENCH_TEST_FAIL_AT_STEP"


def _train_callbacks(rec: Recorder, stop: StopFlag, budget: Budget):
    delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    fail_at = int(os.environ.get(FAIL_AT_ENV) or 0)

    class JobCallbacks(TrainCallbacks):
        best: float | None = None
        step = 0
        total: int | None = None

        def on_start(self, info: dict[str, Any]) -> None:
            self.total = info.get("total_steps")
            rec.update(total_steps=info.get("total_steps"), step=info.get("start_step", 0), phase="training",
                       info=_jsonable(info))
            rec.flush()
            print(f"== training: {info.get('trainable', '?'):,} trainable parameters, "
                  f"{info.get('total_steps')} steps (from step {info.get('start_step', 0)}), "
                  f"{info.get('train_examples')} examples, {info.get('device')} {info.get('dtype')}", flush=True)

        def on_step(self, r: Any) -> None:
            if rec.due():  # before adding: a step's points (train + validation) are always written together
                rec.flush()
            rec.add(**step_record(r))
            rec.update(step=r.step, total_steps=r.total_steps, epoch=finite(r.epoch), eta_s=finite(r.eta_s),
                       last_loss=finite(r.loss))
            self.step = r.step
            print(f"step {r.step}/{r.total_steps} loss {r.loss:.4f} lr {r.lr:.2e} grad {r.grad_norm:.3f} "
                  f"{r.tokens_per_s:,.0f} tok/s eta {r.eta_s:,.0f}s", flush=True)
            if fail_at and r.step >= fail_at:
                raise RuntimeError(f"injected failure at step {r.step} ({FAIL_AT_ENV})")
            if delay:
                time.sleep(delay)

        def on_eval(self, r: Any) -> None:
            rec.add(**eval_record(r))
            if r.val_loss is not None and (self.best is None or r.val_loss < self.best):
                self.best = r.val_loss
                rec.update(best_val_loss=finite(r.val_loss))
            print(f"step {r.step}: validation loss {r.val_loss:.4f}", flush=True)

        def on_checkpoint(self, step: int, path: Path) -> None:
            rec.flush()
            print(f"== checkpoint {path}", flush=True)

        def should_stop(self) -> bool:
            return stop.requested() or rec.cancel_requested() or budget.spent(self.step, self.total)

    return JobCallbacks()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return finite(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


# --------------------------------------------------------------------------------------------------

def run_train(service: JobService, job: dict[str, Any], rec: Recorder, stop: StopFlag,
              budget: Budget) -> tuple[str, dict[str, Any]]:
    """Train (and evaluate) with the job's experiment trackers (``core.trackers``) listening; their link
    records go into the job's ``result["trackers"]`` as soon as a run's page is known."""
    spec = JobSpec.from_dict(job["spec"])
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    run = TrackerRun(name=f"job-{out_dir.name}", config={**spec.to_dict(), "job_id": job["id"]}, out_dir=out_dir,
                     home=service.home)
    with open_trackers(job_trackers(spec), run, on_links=lambda links: rec.update(result={"trackers": links})) \
            as trackers:
        status, values = _train_and_evaluate(service, job, spec, rec, stop, budget, trackers)
        trackers.finish(status)
    if trackers.trackers:
        values["result"]["trackers"] = trackers.links()
    return status, values


def _train_and_evaluate(service: JobService, job: dict[str, Any], spec: JobSpec, rec: Recorder, stop: StopFlag,
                        budget: Budget, trackers: Trackers) -> tuple[str, dict[str, Any]]:
    from core.train import train

    out_dir = Path(job["out_dir"])
    rec.update(phase="loading model and data")
    rec.flush()
    resume = job["resume_checkpoint"]
    if resume:
        print(f"== resuming from {resume}", flush=True)
    result = train(spec, out_dir, CallbackList([_train_callbacks(rec, stop, budget), trackers]), resume_from=resume)
    values: dict[str, Any] = dict(
        step=result.steps, total_steps=result.total_steps, best_val_loss=finite(result.best_val_loss),
        last_loss=finite(result.final_loss), phase=None,
        result=_jsonable({"status": result.status, "steps": result.steps, "total_steps": result.total_steps,
                          "final_loss": result.final_loss, "best_val_loss": result.best_val_loss,
                          "adapter_dir": str(result.adapter_dir), "elapsed_s": result.elapsed_s,
                          "peak_memory_mb": result.peak_memory_mb, "trainable_params": result.trainable_params,
                          "tokens_per_s": getattr(result, "tokens_per_s", None)}))
    print(f"== training {result.status} after {result.steps} steps; adapter in {result.adapter_dir}", flush=True)
    if result.status != "completed":
        if stop.signal:
            return "interrupted", {**values, "error": f"stopped by {stop.signal}"}
        return "cancelled", {**values, "error": budget.reason}
    if spec.eval.benchmarks:
        rec.flush()
        values["result"]["evaluations"] = run_benchmarks(service, spec, job, rec, stop, budget,
                                                         Path(result.adapter_dir), adapter_job_id=job["id"],
                                                         on_result=trackers.on_benchmark)
    return "succeeded", values


def run_evaluate(service: JobService, job: dict[str, Any], rec: Recorder, stop: StopFlag,
                 budget: Budget) -> tuple[str, dict[str, Any]]:
    spec = JobSpec.from_dict(job["spec"])
    adapter_dir, target = None, job["target_job_id"]
    if target is not None:
        adapter_dir = Path(service.get(target)["out_dir"]) / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"job {target} has no adapter at {adapter_dir}")
    ids = run_benchmarks(service, spec, job, rec, stop, budget, adapter_dir, adapter_job_id=target)
    return "succeeded", {"phase": None, "result": {"evaluations": ids}}


def run_export(service: JobService, job: dict[str, Any], rec: Recorder, stop: StopFlag,
               budget: Budget) -> tuple[str, dict[str, Any]]:
    kind = (job.get("info") or {}).get("artifact")
    rec.update(phase=f"exporting {kind}")
    rec.flush()
    path = service.build_artifact(job["target_job_id"], kind)
    print(f"== {kind} export written to {path} ({path.stat().st_size:,} bytes)", flush=True)
    return "succeeded", {"phase": None, "result": {"artifact": kind, "path": str(path),
                                                   "bytes": path.stat().st_size}}


def run_merge(service: JobService, job: dict[str, Any], rec: Recorder, stop: StopFlag,
              budget: Budget) -> tuple[str, dict[str, Any]]:
    """Merge the parents' adapters into this job's adapter (``build_merge``), then evaluate it on
    ``spec.eval.benchmarks`` as a training job evaluates its own."""
    rec.update(phase="merging adapters")
    rec.flush()
    merged = service.build_merge(job["id"])
    print(f"== {merged['method']} merge written to {merged['directory']}: rank {merged['rank']}, "
          f"{merged['params']:,} parameters, retained energy {merged['energy']:.4f}", flush=True)
    values: dict[str, Any] = {"phase": None, "result": {**merged, "adapter_dir": merged["directory"],
                                                       "trainable_params": merged["params"]}}
    spec = JobSpec.from_dict(job["spec"])
    if spec.eval.benchmarks:
        rec.flush()
        values["result"]["evaluations"] = run_benchmarks(service, spec, job, rec, stop, budget,
                                                         Path(merged["directory"]), adapter_job_id=job["id"])
    return "succeeded", values


def run_benchmarks(service: JobService, spec: Any, job: dict[str, Any], rec: Recorder, stop: StopFlag,
                   budget: Budget, adapter_dir: Path | None, adapter_job_id: int | None,
                   on_result: Callable[[str, float, int, int], None] | None = None) -> list[int]:
    """Evaluate the base model (with ``adapter_dir`` loaded if given) on ``spec.eval.benchmarks``;
    ``on_result(name, accuracy, correct, total)`` hears each benchmark's result once recorded."""
    rec.update(phase="loading model for evaluation")
    rec.flush()
    loaded, reduced = _load_base(spec)
    if adapter_dir is not None:
        core.load_adapter(loaded.model, adapter_dir, tokenizer=loaded.tokenizer)
    loaded.model.eval()

    def should_stop() -> bool:
        return stop.requested() or rec.cancel_requested()

    ids = []
    names = list(spec.eval.benchmarks)
    settings = {k: v for k, v in spec.eval.to_dict().items() if k != "benchmarks"}
    for i, name in enumerate(names, 1):
        phase = f"evaluating {name} ({i}/{len(names)})"
        rec.update(phase=phase, step=0, total_steps=None, eta_s=None)
        rec.flush()
        print(f"== {phase}", flush=True)
        started = time.monotonic()

        def progress(done: int, total: int | None = None) -> None:
            eta = (time.monotonic() - started) / done * (total - done) if total and done else None
            rec.update(step=int(done), total_steps=int(total) if total else None, eta_s=eta)
            if rec.due():
                rec.flush()
            if stop.requested() or rec.cancel_requested() or budget.spent():
                raise Cancelled()

        res = core.evaluate(loaded.model, loaded.tokenizer, core.load_benchmark(name), spec.eval, progress=progress,
                            should_stop=should_stop, dtype=reduced, template=spec.data.template)
        if res.stopped:
            raise Cancelled()
        ev = service.record_evaluation(
            benchmark=name, base_model=spec.model.name, accuracy=res.accuracy, correct=res.correct,
            total=res.total, seconds=res.seconds, samples=res.samples, job_id=adapter_job_id, run_job_id=job["id"],
            settings=settings, protocol=res.protocol, accuracy_norm=res.accuracy_norm)
        ids.append(ev)
        if on_result is not None:
            on_result(name, res.accuracy, res.correct, res.total)
        print(f"== {name}: accuracy {res.accuracy:.4f} ({res.correct}/{res.total}) in {res.seconds:.1f}s", flush=True)
    return ids


def _load_base(spec: Any) -> tuple[Any, Any]:
    """The spec's base model for evaluation and the reduced dtype it runs in (None: fp32)."""
    import torch

    dtype = core.resolve_dtype(spec.model.precision, core.resolve_device(spec.model.device))
    reduced = None if dtype == torch.float32 else dtype  # frozen weights and autocast, as in training
    return core.load_model(spec.model, dtype=reduced), reduced


def run_weight_search(service: JobService, job: dict[str, Any], rec: Recorder, stop: StopFlag,
                      budget: Budget) -> tuple[str, dict[str, Any]]:
    """Score the mixing weights of a merge (``core.weight_search``) on the job's one benchmark slice, each
    point a metric point (``search_record``) as it is scored, and write the best mixture as this job's
    adapter. Stopped early (cancel, signal, budget), it still writes the best point so far."""
    from core.merge import write_merge
    from core.weight_search import best_trial, search_record, weight_search

    parents, merge, search = service.weight_search_inputs(job["id"])
    spec = JobSpec.from_dict(job["spec"])
    rec.update(phase="loading model for the weight search", step=0, total_steps=search.budget)
    rec.flush()
    loaded, reduced = _load_base(spec)
    loaded.model.eval()
    bench = core.load_benchmark(spec.eval.benchmarks[0])
    rec.update(phase=f"scoring mixtures on {bench.name}", step=0, total_steps=search.budget)  # after a conversion's
    rec.flush()
    started = time.monotonic()

    def on_trial(trial: Any) -> None:
        eta = (time.monotonic() - started) / trial.index * (search.budget - trial.index)
        rec.add(**search_record(trial))
        rec.update(step=trial.index, eta_s=eta)
        if rec.due():
            rec.flush()
        print(f"point {trial.index}/{search.budget} weights {[round(w, 4) for w in trial.weights]}: "
              f"accuracy {trial.score:.4f} ({trial.correct}/{trial.total})", flush=True)

    def should_stop() -> bool:
        return stop.requested() or rec.cancel_requested() or budget.spent()

    trials = weight_search(loaded.model, loaded.tokenizer, parents, merge, search, bench, spec.eval,
                           on_trial=on_trial, should_stop=should_stop, dtype=reduced, template=spec.data.template)
    if not trials:
        raise Cancelled()
    best = best_trial(trials)
    rec.update(phase="writing the best mixture")
    rec.flush()
    merged = write_merge(parents, dataclasses.replace(merge, weights=best.weights), Path(job["out_dir"]) / "adapter")
    print(f"== best of {len(trials)} points: #{best.index} weights {best.weights}, accuracy {best.score:.4f}; "
          f"adapter in {merged.directory}", flush=True)
    values: dict[str, Any] = {"phase": None, "result": {
        **merged.to_dict(), "adapter_dir": merged.directory, "trainable_params": merged.params,
        "weights": best.weights, "score": best.score, "best_point": best.index, "benchmark": bench.name,
        "points": [t.to_dict() for t in trials]}}
    if len(trials) == search.budget:
        return "succeeded", values
    if stop.signal:
        return "interrupted", {**values, "error": f"stopped by {stop.signal}"}
    return "cancelled", {**values, "error": budget.reason}


RUNNERS = {"train": run_train, "evaluate": run_evaluate, "export": run_export, "merge": run_merge,
           "weight-search": run_weight_search, "lmeval": run_lmeval}
