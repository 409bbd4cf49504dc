"""Command line of the engine.

    python -m core spec                              # the default job spec as JSON: edit it
    python -m core train --config spec.json [--out DIR] [--max-steps N] [--method lora] ...
    python -m core generate --adapter DIR "question"  # answer with a trained adapter (--base: without)
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .config import AdapterConfig, ConfigError, JobSpec
from .train import TrainCallbacks


def _spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = JobSpec.from_json(Path(args.config).read_text()) if args.config else JobSpec()
    if args.method:
        spec.adapter = AdapterConfig.for_method(args.method)
    for flag, section, name in [("model", "model", "name"), ("data", "data", "source"),
                                ("max_steps", "train", "max_steps"), ("epochs", "train", "epochs"),
                                ("lr", "train", "learning_rate"), ("batch_size", "train", "batch_size"),
                                ("micro_batch_size", "train", "micro_batch_size"), ("seed", "train", "seed"),
                                ("limit", "data", "limit"), ("precision", "model", "precision")]:
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(spec, section), name, value)
    return spec.validate()


class ProgressBar(TrainCallbacks):
    """Training callbacks that draw one progress line on stderr."""

    def on_start(self, info):
        print(f"training {info['trainable']:,} parameters ({info['percent']:.3f}% of the base) on "
              f"{info['train_examples']} examples, {info['total_steps']} steps, {info['dtype']}", file=sys.stderr)

    def on_step(self, r):
        width = 30
        done = int(width * r.step / r.total_steps)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {r.step}/{r.total_steps} loss {r.loss:.4f} "
                         f"lr {r.lr:.2e} {r.tokens_per_s:,.0f} tok/s ETA {r.eta_s:,.0f}s ")
        sys.stderr.flush()

    def on_eval(self, r):
        sys.stderr.write(f"\n  step {r.step}: validation loss {r.val_loss:.4f}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="Adapter Workbench engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("spec", help="print the default job spec as JSON")
    tr = sub.add_parser("train", help="train an adapter from a job spec")
    tr.add_argument("--config", help="job spec JSON (default: the built-in default spec)")
    tr.add_argument("--out", help="output directory (default: $WORKBENCH_HOME/runs/cli-<time>)")
    tr.add_argument("--resume", help="checkpoint directory to resume from")
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

    try:
        if args.command == "spec":
            print(JobSpec().to_json())
            return 0
        if args.command == "train":
            from .paths import runs_dir
            from .train import train

            spec = _spec_from_args(args)
            out = Path(args.out) if args.out else runs_dir() / f"cli-{time.strftime('%Y%m%d-%H%M%S')}"
            result = train(spec, out, ProgressBar(), resume_from=args.resume)
            print(f"\n{result.status}: {result.steps} steps in {result.elapsed_s:.0f}s, final loss "
                  f"{result.final_loss:.4f}, best validation loss {result.best_val_loss}, "
                  f"{result.tokens_per_s:,.0f} tokens/s, peak memory {result.peak_memory_mb:,.0f} MB", file=sys.stderr)
            print(result.adapter_dir)
            return 0
        if args.command == "generate":
            from .generate import GenerationSettings, adapter_chat_model, answer, base_chat_model

            chat = adapter_chat_model(args.adapter) if args.adapter else base_chat_model()
            print(answer(chat, args.question, GenerationSettings(max_new_tokens=args.max_new_tokens)))
            return 0
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `python -m core spec | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
