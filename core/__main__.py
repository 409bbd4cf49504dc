"""Command line of the engine.

    python -m core spec                              # the default job spec as JSON: edit it
    python -m core train --config spec.json [--out DIR] [--max-steps N] [--method lora] ...
    python -m core generate --adapter DIR "question"  # answer with a trained adapter (--base: without)

``train --out DIR`` refuses a folder that already holds files, unless ``--resume CHECKPOINT`` continues
a run there or ``--force`` starts over (replacing a previous run's outputs, nothing else).

Several processes (``train.devices`` = N, strategy ``ddp``): the same command under PyTorch's launcher,
``python -m torch.distributed.run --standalone --nproc-per-node N -m core train --config spec.json
--out DIR``; rank 0 checks and writes the folder and prints, the other ranks only train.

Errors print one line, ``error: ...``, on stderr, never a traceback (``WORKBENCH_DEBUG=1`` adds it):
exit status 2 when what was asked is wrong (arguments, the spec file, a folder), 1 when it could not be
done. Arguments are checked before torch is imported, so a mistake is reported at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .callbacks import CallbackList
from .config import AdapterConfig, JobSpec
from .fields import ConfigError
from .paths import InputFileError, WorkbenchHomeError, cli_error, read_json, runs_dir, workbench_home
from .progress import TerminalBars, watching
from .trackers import TrackerRun, job_trackers, open_trackers

USAGE, FAILURE = 2, 1
# What ``core.train.Trainer`` writes into its output folder (named here: importing core.train loads torch),
# and the trackers that keep their files there (``core.trackers``: TensorBoard's events, W&B's offline run).
RUN_OUTPUTS = ("spec.json", "metrics.jsonl", "checkpoints", "adapter", "tensorboard", "wandb")


def _spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = read_json(args.config, "job spec", JobSpec.from_dict) if args.config else JobSpec()
    flagged = []  # the fields set by flags: their errors are the flags', not the file's
    if args.method:
        spec.adapter = AdapterConfig.for_method(args.method)
        flagged.append("adapter")
    for flag, section, name in [("model", "model", "name"), ("data", "data", "source"),
                                ("max_steps", "train", "max_steps"), ("epochs", "train", "epochs"),
                                ("lr", "train", "learning_rate"), ("batch_size", "train", "batch_size"),
                                ("micro_batch_size", "train", "micro_batch_size"), ("seed", "train", "seed"),
                                ("limit", "data", "limit"), ("precision", "model", "precision")]:
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(spec, section), name, value)
            flagged.append(f"{section}.{name}")
    try:
        return spec.validate()
    except ConfigError as err:
        if not args.config or any(err.field == f or err.field.startswith(f + ".") for f in flagged):
            raise
        raise InputFileError(f"{args.config}: {err}") from err


def check_out_dir(out: Path, shown: str, resume: str | None, force: bool) -> None:
    """Refuse to train into ``out`` when it already holds files, unless resuming (``resume``) or told to
    start over (``force``: a previous run's outputs there are removed, other files stay). ``shown`` is the
    folder as the user wrote it. Raises ``InputFileError``."""
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out {shown} is a file, not a folder")
    if resume is not None:
        if not (Path(resume) / "state.pt").is_file():
            steps = sorted((p.parent for p in Path(resume).glob("checkpoints/step-*/state.pt")
                            if p.parent.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
            hint = f" (the latest in that run is {steps[-1]})" if steps else ""
            raise InputFileError(f"--resume {resume} is not a checkpoint folder (it has no state.pt){hint}")
        return
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        listed = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise InputFileError(f"--out {shown} is not empty (it holds {listed}); give --resume CHECKPOINT to "
                             f"continue a run there, --force to start over in it, or another folder")
    for name in RUN_OUTPUTS if held else ():
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


class ProgressBar:
    """Training callbacks (the ``core.train.TrainCallbacks`` interface) that show training on stderr: a
    tqdm bar when stderr is a terminal (``core.progress.TerminalBars``, which also draws the model's
    conversion), else a line every 5% of the steps. Not a subclass, so that this module, and argument
    errors, stay free of torch."""

    def __init__(self) -> None:
        self.bars = TerminalBars()

    def on_start(self, info):
        self.bars.write(f"training {info['trainable']:,} parameters ({info['percent']:.3f}% of the base) on "
                        f"{info['train_examples']} examples, {info['total_steps']} steps, {info['dtype']}")

    def on_step(self, r):
        detail = f"loss {r.loss:.4f} lr {r.lr:.2e} {r.tokens_per_s:,.0f} tok/s"
        if self.bars.enabled:
            self.bars("training", r.step, r.total_steps, detail)
        elif r.step == r.total_steps or r.step % max(1, r.total_steps // 20) == 0:
            self.bars.write(f"step {r.step}/{r.total_steps} {detail} ETA {r.eta_s:,.0f}s")

    def on_eval(self, r):
        self.bars.write(f"  step {r.step}: validation loss {r.val_loss:.4f}")

    def on_checkpoint(self, step, path):
        pass

    def should_stop(self):
        return False

    def end_line(self) -> None:
        """End the bars left open, so what follows starts on a line of its own."""
        self.bars.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="Adapter Workbench engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("spec", help="print the default job spec as JSON")
    tr = sub.add_parser("train", help="train an adapter from a job spec")
    tr.add_argument("--config", help="job spec JSON (default: the built-in default spec)")
    tr.add_argument("--out", help="output directory (default: $WORKBENCH_HOME/runs/cli-<time>)")
    tr.add_argument("--resume", help="checkpoint directory to resume from (OUT/checkpoints/step-N)")
    tr.add_argument("--force", action="store_true",
                    help="train into a non-empty --out folder, replacing a previous run's outputs there")
    tr.add_argument("--method", help="adapter method (its default settings)")
    tr.add_argument("--model")
    tr.add_argument("--data")
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--epochs", type=float)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--micro-batch-size", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--limit", type=int)
    tr.add_argument("--precision")
    gen = sub.add_parser("generate", help="answer a question with a trained adapter")
    gen.add_argument("--adapter", help="adapter directory (a run's adapter/ folder)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("question")
    args = parser.parse_args(argv)

    bar = ProgressBar()
    try:
        with watching(bar.bars):  # the embedded model's conversion, when a command needs it, is drawn too
            return run(args, bar)
    except KeyboardInterrupt:
        bar.end_line()
        return cli_error("interrupted", FAILURE)
    except (InputFileError, ConfigError, FileNotFoundError, ValueError) as err:
        bar.end_line()
        return cli_error(str(err), USAGE)
    except WorkbenchHomeError as err:
        return cli_error(str(err), FAILURE)
    except OSError as err:
        bar.end_line()
        where = f": {err.filename}" if err.filename else ""
        return cli_error(f"{(err.strerror or str(err)).lower()}{where}", FAILURE)
    except Exception as err:  # a bug or, say, out of memory: still one line; the traceback with WORKBENCH_DEBUG=1
        bar.end_line()
        return cli_error(f"unexpected {type(err).__name__}: {err} (WORKBENCH_DEBUG=1 shows the traceback)", FAILURE)


def run(args: argparse.Namespace, bar: ProgressBar) -> int:
    """Carry out the parsed command; errors propagate to ``main``, which reports them."""
    if args.command == "spec":
        print(JobSpec().to_json())
        return 0
    if args.command == "train":
        spec = _spec_from_args(args)
        out = Path(args.out).expanduser() if args.out else runs_dir() / f"cli-{time.strftime('%Y%m%d-%H%M%S')}"
        main_rank = os.environ.get("RANK", "0") == "0"  # torchrun's; read here, before torch is imported
        names = job_trackers(spec) if main_rank else []  # a tracker's missing package is said before anything runs
        trackers = open_trackers(names, TrackerRun(name=out.name, config=spec.to_dict(), out_dir=out,
                                                   home=workbench_home() if names else out))
        if main_rank:
            check_out_dir(out, args.out or str(out), args.resume, args.force)
            out.mkdir(parents=True, exist_ok=True)
        from .sources import allow_remote_code_here
        from .train import train  # torch: only once the arguments are known to be good

        allow_remote_code_here()  # a foreground run is a job: a model's own code may run if the server and spec ask
        with trackers, contextlib.redirect_stdout(sys.stderr):  # stdout holds the adapter's folder, nothing else
            result = train(spec, out, CallbackList([bar, trackers]), resume_from=args.resume)
            trackers.finish(result.status)
        if not main_rank:
            return 0
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
        bar.end_line()
        print(f"{result.status}: {result.steps} steps in {result.elapsed_s:.0f}s, final loss "
              f"{loss}, best validation loss {result.best_val_loss}, "
              f"{result.tokens_per_s:,.0f} tokens/s, peak memory {result.peak_memory_mb:,.0f} MB", file=sys.stderr)
        for link in trackers.links():
            shown = f"failed: {link['error']}" if link["error"] else link["url"] or f"view with: {link['view']}"
            print(f"{link['label']}: {shown}", file=sys.stderr)
        print(result.adapter_dir)
        return 0
    if args.command == "generate":
        if args.adapter and not Path(args.adapter).is_dir():
            raise InputFileError(f"--adapter {args.adapter}: no such folder (a run's adapter/ folder)")
        from .generate import GenerationSettings, adapter_chat_model, answer, base_chat_model

        chat = adapter_chat_model(args.adapter) if args.adapter else base_chat_model()
        print(answer(chat, args.question, GenerationSettings(max_new_tokens=args.max_new_tokens)))
        return 0
    return FAILURE


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `python -m core spec | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
