"""Command line of the jobs service.

    python -m jobs submit spec.json [--kind train|evaluate] [--name NAME] [--gpu-memory GIB]  # prints the id
    python -m jobs list [--status S] [--json]
    python -m jobs show ID [--json]
    python -m jobs cancel ID
    python -m jobs resume ID                                                # last line: the new job id
    python -m jobs logs ID [--tail N] [--follow]
    python -m jobs delete ID [--keep-files]
    python -m jobs export ID [--kind adapter|peft|merged|gguf-f16|gguf-q8_0|ollama|gguf-lora]  # the zip's path
    python -m jobs merge ID ID... [--method ties] [--weights 0.5,0.5] [--rank R] [--density D] [--drop P]
                         [--seed S] [--benchmarks B,B] [--name NAME]         # prints the merge job's id
    python -m jobs weight-search ID ID... --benchmark B [merge's options] [--budget N] [--low L] [--high H]
                         [--search-seed S] [--limit N]                       # prints the search job's id
    python -m jobs lmeval [--job ID | --model M] [--tasks T,T] [--task-yaml FILE] [--limit N]
                         [--num-fewshot K] [--batch-size B] [--name NAME]   # lm-eval tasks; prints the job id
    python -m jobs evaluations [--job ID] [--json]
    python -m jobs worker [--devices auto|cpu|cuda|cuda:0,1] [--tag NAME] [--concurrency N]
                          [--lease S] [--heartbeat S] [--poll S] [--until-idle]
    python -m jobs workers [--json]                                         # the registry: live and stale
    python -m jobs space-export DIR [--force] [--title T] [--admins A,B] [--allow-models M,N]
                         [--allow-datasets D,E] [--set WORKBENCH_X=V]       # the files of a Hugging Face Space

``--db URL`` (before the command) picks the database; default ``$WORKBENCH_DB_URL`` or
``$WORKBENCH_HOME/workbench.db``.

Errors print one line, ``error: ...``, on stderr, never a traceback (``WORKBENCH_DEBUG=1`` adds it):
exit status 2 when what was asked is wrong (arguments, a spec or study file, an unknown id), 1 when it
could not be done (the database, the data folder, a job whose state does not allow it, an interrupt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable

from core.config import JobSpec
from core.paths import InputFileError, WorkbenchHomeError, cli_error, read_json, settings_of

from .artifacts import ARTIFACT_KINDS
from .db import DatabaseError
from .devices import GiB, parse_devices
from .errors import JobError, JobNotFound
from .evaluations import PROTOCOLS, result_label
from .schema import STATUSES
from .service import JobService
from .worker import HEARTBEAT_S, LEASE_S

USAGE, FAILURE = 2, 1


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` that is at least ``low``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {text})")
        return value
    return parse


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _progress(job: dict) -> str:
    p = job["progress"]
    if p["total"]:
        return f"{p['step']}/{p['total']}"
    return str(p["step"] or "-")


def _print_table(jobs: list[dict]) -> None:
    rows = [("ID", "KIND", "STATUS", "PROGRESS", "LOSS", "BEST VAL", "TIME", "NAME")]
    for j in jobs:
        loss = j["progress"]["loss"]
        rows.append((str(j["id"]), j["kind"], j["status"] + ("*" if j["cancel_requested"] and j["status"] == "running"
                                                              else ""),
                     _progress(j), f"{loss:.4f}" if loss is not None else "-",
                     f"{j['best_val_loss']:.4f}" if j["best_val_loss"] is not None else "-",
                     _fmt_s(j["duration_s"]), j["name"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _show(job: dict) -> None:
    p = job["progress"]
    lines = [
        f"job {job['id']}: {job['name']}",
        f"  kind      {job['kind']}",
        f"  status    {job['status']}" + (" (cancel requested)" if job["cancel_requested"] and job["status"] == "running"
                                          else ""),
        f"  progress  {_progress(job)}" + (f" ({p['phase']})" if p["phase"] else "")
        + (f", ETA {_fmt_s(p['eta_s'])}" if p["eta_s"] is not None and job["status"] == "running" else ""),
        f"  loss      {p['loss']:.4f}" if p["loss"] is not None else "  loss      -",
        f"  best val  {job['best_val_loss']:.4f}" if job["best_val_loss"] is not None else "  best val  -",
        f"  created   {job['created_at']}",
        f"  started   {job['started_at'] or '-'}",
        f"  finished  {job['finished_at'] or '-'}",
        f"  output    {job['out_dir']}",
    ]
    needs = job["needs"]
    if needs["device"] != "auto" or needs["processes"] > 1 or needs["gpu_memory"]:
        memory = f", {needs['gpu_memory'] / GiB:g} GiB per GPU" if needs["gpu_memory"] else ""
        lines.append(f"  needs     {needs['device']} x{needs['processes']}{memory}")
    if job["ran_on"]:
        lines.append(f"  worker    {job['ran_on']['tag']} on {job['ran_on']['host']}")
    elif job["worker"]:
        lines.append(f"  worker    {job['worker']}")
    if job["resumes_job_id"] is not None:
        lines.append(f"  resumes   job {job['resumes_job_id']} from {job['resume_checkpoint']}")
    if job["target_job_id"] is not None:
        lines.append(f"  evaluates job {job['target_job_id']}")
    if job["error"]:
        lines.append(f"  error     {job['error']}")
    print("\n".join(lines))
    if job["traceback"] and job["status"] == "failed":
        print("  traceback (end):")
        print("\n".join("    " + line for line in job["traceback"].rstrip().splitlines()[-15:]))


WORKER_HELP = """\
Run queued jobs in child processes. Start one on each machine that shares the database
(--db or $WORKBENCH_DB_URL; several machines need PostgreSQL) and the runs directory
($WORKBENCH_HOME/runs: one shared folder, at the same path on every machine)."""
WORKER_EPILOG = """\
A worker claims only the jobs its devices can run: model.device cpu runs anywhere (with
train.devices N, as N CPU processes); cuda needs train.devices free GPUs of this worker, each
with the job's --gpu-memory; auto takes GPUs on a CUDA worker and the CPU on a CPU worker.
$WORKBENCH_WORKER_HOST names this machine when its host name is not unique (containers).

examples:
  python -m jobs worker --devices cuda:0,1 --concurrency 2 --tag gpu-box-a
  python -m jobs worker --devices cpu --tag laptop"""


def _print_workers(workers: list[dict]) -> None:
    rows = [("ID", "STATE", "HEARTBEAT", "DEVICES", "JOBS", "TAG", "HOST")]
    for w in workers:
        rows.append((str(w["id"]), "live" if w["live"] else "stale", f"{w['heartbeat_age_s']:.0f} s ago",
                     w["summary"], ",".join(map(str, w["jobs"])) or "-", w["tag"] or "-", w["host"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def benchmark_list(text: str) -> list[str]:
    """Comma-separated benchmarks, where a built-in part keeps its own commas:
    ``builtin:math?ops=add,sub,AddSub`` -> ``["builtin:math?ops=add,sub", "AddSub"]``."""
    from core.sources import MATH_OPS

    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if out and "?ops=" in out[-1] and part in MATH_OPS:
            out[-1] += f",{part}"
        elif part:
            out.append(part)
    return out


def _merge_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The merge settings of ``python -m jobs merge`` (``--weights`` parsed; default: equal weights)."""
    from core.fields import ConfigError

    weights = [1.0 / len(args.ids)] * len(args.ids)
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ConfigError("weights", f"expected numbers separated by commas, got {args.weights!r}") from None
    return {"method": args.method, "weights": weights, "rank": args.rank, "density": args.density,
            "drop": args.drop, "seed": args.seed}


def _merge_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand taking parent job ids and the merge settings (``merge``, ``weight-search``)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="finished jobs whose adapters to merge")
    p.add_argument("--method", default="ties", help="cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--weights", help="one weight per adapter, comma-separated (default: equal, summing to 1)")
    p.add_argument("--rank", type=int, help="rank r' of the result (default: the largest parent rank; not for cat)")
    p.add_argument("--density", type=float, default=0.2, help="TIES, magnitude prune: fraction of entries kept")
    p.add_argument("--drop", type=float, default=0.5, help="DARE: drop probability p")
    p.add_argument("--seed", type=int, default=0, help="DARE: seed of the masks")
    p.add_argument("--name")
    return p


def _space_export(args: argparse.Namespace) -> int:
    from .space_export import SpaceExportError, SpaceSettings, export_space

    def ids(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    extra = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SpaceExportError(f"--set {item!r}: use NAME=VALUE")
        extra[name.strip()] = value.strip()
    settings = SpaceSettings(title=args.title, admins=ids(args.admins), allowed_models=ids(args.allow_models),
                             allowed_datasets=ids(args.allow_datasets), extra=extra)
    export_space(args.dir, settings, force=args.force)
    print(f"Space files written to {args.dir}. Next, with OWNER/NAME your Space:\n"
          f"  hf repos create OWNER/NAME --type space --sdk gradio\n"
          f"  hf spaces variables add OWNER/NAME --env-file {args.dir}/space-variables.env\n"
          f"  hf upload OWNER/NAME {args.dir} . --repo-type space\n"
          "and attach a persistent storage volume (Settings) so jobs survive a restart.", file=sys.stderr)
    print(args.dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs", description="Adapter Workbench background jobs")
    parser.add_argument("--db", help="database URL (default $WORKBENCH_DB_URL or $WORKBENCH_HOME/workbench.db)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="queue a job from a spec JSON file ('-' = stdin)")
    p.add_argument("spec")
    p.add_argument("--kind", default="train", choices=["train", "evaluate"])
    p.add_argument("--name")
    p.add_argument("--target", type=int, help="evaluate: the training job whose adapter to evaluate")
    p.add_argument("--gpu-memory", type=at_least(0.001, float), metavar="GIB",
                   help="only a worker whose GPUs have at least this many GiB each runs it (with model.device "
                        "cuda or auto; train.devices says how many GPUs)")
    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--limit", type=at_least(1))
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="one job")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    for name, text in [("cancel", "cancel a queued or running job"), ("resume", "continue from the last checkpoint")]:
        sub.add_parser(name, help=text).add_argument("id", type=int)
    p = sub.add_parser("logs", help="the job's log")
    p.add_argument("id", type=int)
    p.add_argument("--tail", type=at_least(0), default=200, help="last N lines (0 = all)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p = sub.add_parser("delete", help="delete a finished job and its files")
    p.add_argument("id", type=int)
    p.add_argument("--keep-files", action="store_true")
    p = sub.add_parser("export", help="zip the job's adapter")
    p.add_argument("id", type=int)
    p.add_argument("--kind", default="adapter", choices=ARTIFACT_KINDS)
    p = _merge_parser(sub, "merge", "queue a merge of finished adapters (core.merge); prints the job id")
    p.add_argument("--benchmarks", default="", help="evaluate the result on these, comma-separated")
    p.add_argument("--evaluate-parents", action="store_true", help="also evaluate parents lacking those benchmarks")
    p = _merge_parser(sub, "weight-search", "queue a search of a merge's weights (core.weight_search), the best "
                                            "mixture saved as the job's adapter; prints the job id")
    p.add_argument("--benchmark", required=True, help="what each point is scored on: a benchmark, builtin:math"
                                                      "[?ops=...] or a file of labelled examples")
    p.add_argument("--budget", type=at_least(1), default=12, help="points scored, --weights first (default 12)")
    p.add_argument("--low", type=float, default=0.0, help="lowest weight drawn (default 0)")
    p.add_argument("--high", type=float, default=1.0, help="highest weight drawn (default 1)")
    p.add_argument("--search-seed", type=at_least(0), default=0, help="seed of the drawn points")
    p.add_argument("--limit", type=at_least(0), default=20, help="score on the first N examples (0 = all; default 20)")
    p.add_argument("--sample-seed", type=int, default=-1, help="a seeded sample of --limit examples (-1 = the first)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="generation budget per answer")
    p = sub.add_parser("lmeval", help="queue lm-evaluation-harness tasks on a base model or an adapter job "
                                      "(needs requirements-lmeval.txt); prints the job id")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--job", type=int, help="a training, merge or weight-search job whose adapter to evaluate")
    which.add_argument("--model", help="a base model (default: the default base model)")
    p.add_argument("--tasks", default="", help="lm-eval task names, comma-separated (e.g. arc_easy,hellaswag)")
    p.add_argument("--task-yaml", help="a custom lm-eval task YAML ('-' = stdin); its data files are checked")
    p.add_argument("--limit", type=at_least(0), default=0, help="the first N documents of each task (0 = all)")
    p.add_argument("--num-fewshot", type=at_least(0), help="few-shot examples (default: the task's own)")
    p.add_argument("--batch-size", type=at_least(1), help="requests scored together (default: the spec's eval batch)")
    p.add_argument("--name")
    p = sub.add_parser("evaluations", help="benchmark results")
    p.add_argument("--job", type=int)
    p.add_argument("--protocol", choices=PROTOCOLS, help="only results scored by this protocol")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("study", help="launch a study (grid of jobs) from a study JSON file; prints its id")
    p.add_argument("spec")
    p.add_argument("--plan", action="store_true", help="only show the grid size and estimated time")
    p = sub.add_parser("study-show", help="a study's progress and, when evaluated, its tables")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    for name, text in [("study-cancel", "cancel every unfinished job of a study"),
                       ("study-resume", "continue every unfinished job of a study")]:
        sub.add_parser(name, help=text).add_argument("id", type=int)
    p = sub.add_parser("compare", help="accuracy matrix of evaluated models (Markdown or CSV)")
    p.add_argument("--csv", action="store_true")
    p = sub.add_parser("worker", help="run queued jobs until stopped", description=WORKER_HELP, epilog=WORKER_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto", metavar="SPEC",
                   help="what this worker offers: auto (every GPU here, else the CPU; default), cpu, cuda (every "
                        "GPU) or cuda:0,1 (those GPUs); each job process gets one GPU of its own")
    p.add_argument("--tag", help="the name the Jobs tab shows for this worker (default host:pid)")
    p.add_argument("--concurrency", type=at_least(1), default=1, help="jobs run side by side (default 1)")
    p.add_argument("--lease", type=at_least(0.1, float), default=LEASE_S, metavar="S",
                   help=f"seconds this worker's jobs survive its silence before any other worker marks them "
                        f"interrupted (default {LEASE_S:g}; at least twice --heartbeat)")
    p.add_argument("--heartbeat", type=at_least(0.05, float), default=HEARTBEAT_S, metavar="S",
                   help=f"seconds between heartbeats, on the database's clock (default {HEARTBEAT_S:g})")
    p.add_argument("--poll", type=at_least(0.01, float), default=1.0, metavar="S",
                   help="seconds between looks at the queue (default 1)")
    p.add_argument("--until-idle", action="store_true",
                   help="exit when nothing this worker could run is queued and nothing runs here")
    p = sub.add_parser("workers", help="the workers sharing this database: devices, heartbeat, running jobs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("space-export", help="write the files of a Hugging Face Space running this workbench "
                                            "in public mode (jobs/space_export.py)")
    p.add_argument("dir", help="a new or empty folder (e.g. a clone of the Space's repository)")
    p.add_argument("--force", action="store_true", help="replace the Space's files in a non-empty folder")
    p.add_argument("--title", default="Adapter Workbench", help="the Space's title")
    p.add_argument("--admins", default="", help="Hugging Face user names who are admins, comma-separated")
    p.add_argument("--allow-models", default="", help="hub model ids visitors may train on, beyond the catalogue")
    p.add_argument("--allow-datasets", default="", help="hub dataset ids visitors may use")
    p.add_argument("--set", action="append", default=[], metavar="WORKBENCH_X=VALUE",
                   help="another Variable of the Space, e.g. WORKBENCH_LIMIT_MAX_STEPS=500 (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "worker" and args.lease < 2 * args.heartbeat:
        parser.error(f"--lease ({args.lease:g}) must be at least twice --heartbeat ({args.heartbeat:g})")
    if getattr(args, "target", None) is not None and args.kind != "evaluate":
        parser.error("--target is for --kind evaluate")

    try:
        return run(args)
    except BrokenPipeError:  # `python -m jobs list | head`: the reader is gone; so is anything left to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return cli_error("interrupted", FAILURE)
    except JobNotFound as err:  # before JobError: an id that does not exist is a wrong argument
        return cli_error(str(err), USAGE)
    except KeyError as err:  # "no study 7", "no evaluation 3"
        return cli_error(str(err.args[0]) if err.args else "not found", USAGE)
    except (InputFileError, FileNotFoundError, ValueError) as err:  # a bad --devices (DevicesError) too
        # ConfigError is a ValueError: "error: spec.json: train.learning_rate: must be > 0 (got -0.001)"
        return cli_error(str(err), USAGE)
    except (DatabaseError, WorkbenchHomeError, JobError, NotImplementedError) as err:
        return cli_error(str(err), FAILURE)
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        return cli_error(f"{(err.strerror or str(err)).lower()}{where}", FAILURE)
    except Exception as err:  # a bug: still one line, the traceback with WORKBENCH_DEBUG=1
        return cli_error(f"unexpected {type(err).__name__}: {err} (WORKBENCH_DEBUG=1 shows the traceback)", FAILURE)


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed command; errors propagate to ``main``, which reports them."""
    cmd = args.command
    spec: Any = None
    if cmd == "submit":  # the file first: a bad spec is reported without touching the database
        spec = read_json(args.spec, "job spec", JobSpec.from_dict)
        with settings_of("<stdin>" if args.spec == "-" else args.spec):
            spec.validate()
    elif cmd == "study":
        from core.study import StudySpec

        spec = read_json(args.spec, "study file", StudySpec.from_dict)
    elif cmd == "worker":  # a bad --devices is told before the database is opened
        devices = parse_devices(args.devices)
    elif cmd == "space-export":  # no database: files only
        return _space_export(args)
    service = JobService(args.db)
    if cmd == "submit":
        name = "<stdin>" if args.spec == "-" else args.spec
        gpu_memory = round(args.gpu_memory * GiB) if args.gpu_memory is not None else None
        with settings_of(name):
            job_id = service.submit(spec, kind=args.kind, name=args.name, target_job_id=args.target,
                                    gpu_memory=gpu_memory)
        print(f"queued {args.kind} job {job_id}", file=sys.stderr)
        print(job_id)
    elif cmd == "list":
        jobs = service.list_jobs(status=args.status, limit=args.limit)
        if args.json:
            print(json.dumps(jobs, indent=2))
        else:
            _print_table(jobs)
    elif cmd == "show":
        job = service.get(args.id)
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            _show(job)
    elif cmd == "cancel":
        status = service.cancel(args.id)
        print(f"job {args.id}: {'cancel requested; it stops at its next step' if status == 'running' else status}")
    elif cmd == "resume":
        new_id = service.resume(args.id)
        print(f"job {new_id} continues job {args.id} from {service.get(new_id)['resume_checkpoint']}",
              file=sys.stderr)
        print(new_id)
    elif cmd == "logs":
        text = service.logs(args.id, args.tail or None)
        sys.stdout.write(text)
        if args.follow:
            path = service.log_path(args.id)
            pos = path.stat().st_size if path.is_file() else 0
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops following
                while True:
                    if path.is_file():
                        with open(path, encoding="utf-8", errors="replace") as f:
                            f.seek(pos)
                            chunk = f.read()
                            pos = f.tell()
                        sys.stdout.write(chunk)
                        sys.stdout.flush()
                    if service.get(args.id)["status"] not in ("queued", "running"):
                        break
                    time.sleep(0.5)
    elif cmd == "delete":
        service.delete(args.id, files=not args.keep_files)
        print(f"job {args.id} deleted")
    elif cmd == "export":
        from core.progress import TerminalBars

        with TerminalBars():  # bars on a terminal's stderr: loading (converting), writing, zipping
            path = service.build_artifact(args.id, args.kind)
        print(path)
    elif cmd == "merge":
        job_id = service.submit_merge(args.ids, _merge_settings(args), name=args.name,
                                      benchmarks=benchmark_list(args.benchmarks),
                                      evaluate_parents=args.evaluate_parents)
        plan = service.get(job_id)["info"]["plan"]
        print(f"queued merge job {job_id}: rank {plan['rank']}, {plan['params']:,} parameters", file=sys.stderr)
        print(job_id)
    elif cmd == "weight-search":
        job_id = service.submit_weight_search(
            args.ids, _merge_settings(args), {"budget": args.budget, "low": args.low, "high": args.high,
                                              "seed": args.search_seed}, args.benchmark, name=args.name,
            eval_settings={"limit": args.limit, "sample_seed": args.sample_seed,
                           "max_new_tokens": args.max_new_tokens})
        print(f"queued weight-search job {job_id}: {args.budget} points on {args.benchmark}", file=sys.stderr)
        print(job_id)
    elif cmd == "lmeval":
        from core.paths import read_text

        yaml_text = read_text(args.task_yaml, "task YAML") if args.task_yaml else None
        job_id = service.submit_lmeval(args.tasks, task_yaml=yaml_text, job_id=args.job, model=args.model,
                                       limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                       name=args.name)
        print(f"queued lmeval job {job_id}: {service.get(job_id)['name']}", file=sys.stderr)
        print(job_id)
    elif cmd == "evaluations":
        rows = service.list_evaluations(job_id=args.job, protocol=args.protocol)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                who = f"job {r['job_id']}" if r["job_id"] is not None else f"base {r['base_model']}"
                norm = f"  norm {100 * r['accuracy_norm']:6.2f}%" if r["accuracy_norm"] is not None else ""
                print(f"{r['id']:>4}  {result_label(r['benchmark'], r['protocol']):<28} {100 * r['accuracy']:6.2f}%  "
                      f"({r['correct']}/{r['total']}){norm}  {who}")
    elif cmd == "study":
        with settings_of(args.spec):
            plan = service.plan_study(spec)
            print(f"{plan['num_jobs']} training jobs, about {plan['estimated_s'] / 60:.0f} minutes of "
                  f"training at {service.measured_tokens_per_s():.0f} tokens/s", file=sys.stderr)
            if not args.plan:
                print(service.submit_study(spec))
    elif cmd == "study-show":
        study = service.get_study(args.id)
        report = service.study_report(args.id)
        if args.json:
            print(json.dumps({**study, "analysis": report["analysis"]}, indent=2, default=str))
        else:
            print(f"study {study['id']} {study['name']}: {study['status']} "
                  f"({', '.join(f'{n} {k}' for k, n in study['counts'].items())})")
            print(report["markdown"] or "(no evaluations yet)")
    elif cmd == "study-cancel":
        print(f"{service.cancel_study(args.id)} jobs cancelled")
    elif cmd == "study-resume":
        print(" ".join(map(str, service.resume_study(args.id))) or "nothing to resume")
    elif cmd == "compare":
        matrix = service.comparison()
        print(service.comparison_csv(matrix) if args.csv else service.comparison_markdown(matrix), end="")
    elif cmd == "worker":
        from .worker import main as worker_main

        return worker_main(service, concurrency=args.concurrency, poll_s=args.poll, until_idle=args.until_idle,
                           devices=devices, name=args.tag, heartbeat_s=args.heartbeat, lease_s=args.lease)
    elif cmd == "workers":
        workers = service.list_workers()
        if args.json:
            print(json.dumps(workers, indent=2))
        else:
            _print_workers(workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
