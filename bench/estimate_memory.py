"""The training-memory estimate against what a training process really holds, per method.

    .venv/bin/python bench/estimate_memory.py [--methods lora,series,prefix] [--steps 10] [--data PATH]
                                              [--kernels fast]

Each method trains the embedded model (the spec of ``bench/train_throughput.py``: batch 16, micro-batch
4, cut-off 256, no validation, no checkpoint) in its own process, which reports its peak resident
memory over steps 2..N: the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` when step 1 ends and read when step N ends, before the adapter is saved
(where that reset is refused, a thread samples ``VmRSS`` every 5 ms instead). The estimate is
``core.estimate.estimate`` for the same settings. Last line: ``estimate_memory_max_error: <x>``, the
largest ``|estimate - measured| / measured`` over the methods.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "train" / "math_3k.json"
MB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRss:
    """The peak resident memory from ``reset()`` on: the kernel's high-water mark, or sampled."""

    def __init__(self):
        self.sampled = 0
        self.thread: threading.Thread | None = None

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux 4.0+)
            return
        except OSError:
            pass
        self.sampled = _status("VmRSS")
        if self.thread is None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, _status("VmRSS"))
            time.sleep(0.005)

    def read(self) -> int:
        return self.sampled if self.thread is not None else _status("VmHWM")


def child(args) -> None:
    from bench.train_throughput import spec_for
    from core.callbacks import TrainCallbacks
    from core.train import train

    baseline = _status("VmRSS")  # this process with torch and transformers imported
    peak = PeakRss()
    marks: dict[str, int] = {}

    class Probe(TrainCallbacks):
        def on_start(self, info):
            marks["setup"] = _status("VmRSS")

        def on_step(self, report):
            if report.step == 1:
                peak.reset()
            if report.step == args.steps:
                marks["peak"] = peak.read()

    spec = spec_for(args.method, args.data, args.steps)
    spec.train.kernels = args.kernels
    train(spec, args.out, Probe())
    print("RESULT " + json.dumps({"baseline": baseline, **marks}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="lora,series,prefix")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data", default=str(SHARED_TRAIN) if SHARED_TRAIN.is_file() else "builtin:math")
    parser.add_argument("--kernels", default="fast", choices=("fast", "reference"))
    parser.add_argument("--method")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.method:
        child(args)
        return
    import tempfile

    from bench.train_throughput import spec_for
    from core.estimate import estimate

    print(f"# data {args.data}, batch 16 (micro 4, cut-off 256), kernels {args.kernels}, "
          f"peak RSS over steps 2..{args.steps}; MB")
    print("| method | estimate | weights | adapter & AdamW | activations | logits | runtime | measured peak "
          "| error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    from core.embedded import ensure_converted

    # A fresh home converts the embedded model here, not in a measured process (its heap would keep it).
    ensure_converted(spec_for("lora", args.data, 1).model.name)
    errors = {}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--method", method, "--steps", str(args.steps), "--data", args.data,
                   "--kernels", args.kernels, "--out", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"{method} failed")
        measured = json.loads(line[-1][7:])
        spec = spec_for(method, args.data, args.steps)
        spec.train.kernels = args.kernels
        est = estimate(spec.model, spec.adapter, spec.data, spec.train)
        parts = est["memory_parts"]
        errors[method] = (est["memory_bytes"] - measured["peak"]) / measured["peak"]
        cells = " | ".join(f"{parts.get(k, 0) / MB:.0f}" for k in
                           ("weights", "adapter_and_optimizer", "activations", "logits", "runtime"))
        print(f"| {method} | {est['memory_bytes'] / MB:.0f} | {cells} | {measured['peak'] / MB:.0f} | "
              f"{errors[method]:+.1%} |", flush=True)
        print(f"#   {method}: process after imports {measured['baseline'] / MB:.0f} MB, after setup "
              f"{measured['setup'] / MB:.0f} MB", flush=True)
    print(f"estimate_memory_max_error: {max(abs(e) for e in errors.values()):.3f}")


if __name__ == "__main__":
    main()
