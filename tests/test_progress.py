"""Progress everywhere users wait: ``core.progress`` reports, the job's row they fill (read through the
service API as the Jobs tab reads it), and the terminal bars, silent when stderr is not a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from core.progress import TerminalBars, report, track, watching
from tests.test_jobs_support import tiny_spec


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reports_reach_the_watcher_of_their_block_only():
    seen: list[tuple] = []
    report("nobody watches", 1, 2)
    with watching(lambda *a: seen.append(a)):
        assert list(track(["a", "b"], "step")) == ["a", "b"]
        with watching(lambda *a: seen.append(("inner", *a))):
            report("x", 1, 1)
        report("y", 1, None, "detail")
    report("after", 1, 1)
    assert seen == [("step", 0, 2, None), ("step", 1, 2, None), ("step", 2, 2, None), ("inner", "x", 1, 1, None),
                    ("y", 1, None, "detail")]


def test_terminal_bars_draw_on_a_terminal_and_stay_silent_elsewhere():
    pipe = io.StringIO()
    with TerminalBars(pipe) as bars:
        for _ in track(range(3), "converting"):
            pass
        assert not bars.enabled
    assert pipe.getvalue() == ""
    tty = Terminal()
    with TerminalBars(tty) as bars:
        for _ in track(range(3), "converting"):
            pass
        report("zipping", 1, 4)
        assert list(bars.bars) == ["zipping"]  # a finished bar is closed, an unfinished one kept open
    assert not bars.bars
    out = tty.getvalue()
    assert "converting" in out and "3/3" in out and "zipping" in out and "1/4" in out


def test_the_training_bar_writes_lines_to_a_log_and_a_bar_to_a_terminal(capsys):
    from core.__main__ import ProgressBar

    def steps(bar: ProgressBar) -> None:
        for step in range(1, 41):
            bar.on_step(SimpleNamespace(step=step, total_steps=40, loss=1.0 / step, lr=1e-3, tokens_per_s=100.0,
                                        eta_s=40.0 - step))
        bar.on_eval(SimpleNamespace(step=40, val_loss=0.5))
        bar.end_line()

    steps(ProgressBar())  # pytest's captured stderr is not a terminal
    log = capsys.readouterr().err
    assert "\r" not in log and len(log.splitlines()) == 21 and log.splitlines()[-1].endswith("validation loss 0.5000")
    bar = ProgressBar()
    bar.bars = TerminalBars(Terminal())
    steps(bar)
    drawn = bar.bars.stream.getvalue()
    assert "training" in drawn and "40/40" in drawn and "\r" in drawn and "validation loss 0.5000" in drawn


def test_the_conversion_reports_tensor_by_tensor_while_it_runs():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from core.embedded import _tensor_progress

    library_bar = gguf_utils.tqdm
    seen: list[tuple] = []
    with watching(lambda *a: seen.append(a)), _tensor_progress("converting tiny"):
        assert list(gguf_utils.tqdm(["t0", "t1"], desc="Converting and de-quantizing GGUF tensors...")) == ["t0", "t1"]
    assert gguf_utils.tqdm is library_bar
    assert seen == [("converting tiny", 0, 2, None), ("converting tiny", 1, 2, None), ("converting tiny", 2, 2, None)]


def _snapshots(monkeypatch: pytest.MonkeyPatch, service, job_id: int) -> list[dict]:
    """The job's progress as the service API gives it, read after every write of the job's row (each
    report written at once: no 1 s batching)."""
    import jobs.run as run

    seen: list[dict] = []
    flush = run.Recorder.flush

    def flush_and_read(self) -> None:
        flush(self)
        seen.append(service.get(job_id)["progress"])

    monkeypatch.setattr(run, "FLUSH_EVERY_S", 0.0)
    monkeypatch.setattr(run.Recorder, "flush", flush_and_read)
    return seen


def _fractions(seen: list[dict], phase: str) -> list[float]:
    return [p["fraction"] for p in seen if (p["phase"] or "").startswith(phase) and p["fraction"] is not None]


def test_an_evaluate_job_records_increasing_progress(service, tiny_model_dir, monkeypatch):
    from jobs.run import run_job

    job_id = service.submit_evaluation(["builtin:math"], model=str(tiny_model_dir),
                                       settings={"limit": 6, "max_new_tokens": 3, "batch_size": 2})
    seen = _snapshots(monkeypatch, service, job_id)
    assert run_job(service, job_id) == 0, service.get(job_id)["traceback"]
    fractions = _fractions(seen, "evaluating builtin:math")
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0 and len(set(fractions)) >= 4
    assert service.get(job_id)["status"] == "succeeded"


@pytest.mark.slow  # trains a tiny adapter first
def test_an_export_job_records_increasing_progress(service, tiny_model_dir, data, monkeypatch):
    from app.job_text import progress_text
    from jobs.run import run_job

    trained = service.submit(tiny_spec(tiny_model_dir, data, max_steps=2))
    assert run_job(service, trained) == 0, service.get(trained)["traceback"]
    job_id = service.export(trained, "merged")
    seen = _snapshots(monkeypatch, service, job_id)
    assert run_job(service, job_id) == 0, service.get(job_id)["traceback"]
    stages = _fractions(seen, "exporting merged")
    assert stages == sorted(stages) and stages[0] == 0.0 and stages[-1] == 1.0 and len(set(stages)) == 4
    zipped = _fractions(seen, "zipping")
    assert zipped == sorted(zipped) and zipped[-1] == 1.0
    job = service.get(job_id)
    assert job["status"] == "succeeded" and progress_text(job) == "done"
    running = {**job, "status": "running", "progress": next(p for p in seen if p["phase"] == "exporting merged"
                                                            and p["step"] == 1)}
    assert progress_text(running) == "exporting merged: 1/3 (33%)"


def test_a_finished_job_that_is_not_training_reads_done():
    from app.job_text import progress_text

    for kind in ("evaluate", "export", "merge", "lmeval"):
        job = {"kind": kind, "status": "succeeded", "progress": {"step": 3, "total": 7, "phase": None}}
        assert progress_text(job) == "done"
    assert progress_text({"kind": "train", "status": "succeeded", "progress": {"step": 7, "total": 7}}) == "7/7 (100%)"
