"""The real app in headless Chromium: train from the Train tab, watch it in Jobs, chat with it, see it in Compare.

``app.py`` runs as a subprocess (with its worker thread) on a free port, with ``WORKBENCH_HOME`` in a
temporary directory, a tiny local LLaMA checkpoint and a tiny uploaded dataset, so the whole journey
takes well under a minute on a CPU. Screenshots go to ``test-output/e2e/``. Skipped where Debian's
Chromium (``apt-get install chromium``) or the ``playwright`` package is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

from tests.tiny import build_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-output" / "e2e"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
BENCHMARK_LIMIT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py did not answer on {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    build_tiny_checkpoint(root / "tiny-model")
    rows = [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}.",
             "answer": str(a + b)} for a in range(2, 8) for b in range(3, 7)]
    (root / "tiny-data.json").write_text(json.dumps(rows))
    return root


@contextlib.contextmanager
def running_app(home: Path, log: Path, worker: bool = True) -> Iterator[str]:
    """``app.py`` in its own process group on a free port (``WORKBENCH_HOME=home``, its output in ``log``,
    its worker thread only if ``worker``); yields its URL, and stops it afterwards (copying the log into
    ``SHOTS`` when that folder exists)."""
    port = _free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(home), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    for name in ("WORKBENCH_USER", "WORKBENCH_DB_URL", "WORKBENCH_NO_WORKER"):
        env.pop(name, None)
    if not worker:
        env["WORKBENCH_NO_WORKER"] = "1"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if SHOTS.is_dir():
            shutil.copy(log, SHOTS / log.name)


@pytest.fixture(scope="module")
def server(workdir):
    with running_app(workdir / "home", workdir / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 950})
        pg.set_default_timeout(30_000)
        pg.goto(server)
        yield pg
        browser.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _set(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True).first
    box.fill(value)
    box.press("Tab")


def test_train_watch_chat_compare(page, workdir):
    start = time.time()
    # ---- Train tab: the embedded default is preselected and estimated.
    expect(page.get_by_text("trainable parameters")).to_be_visible(timeout=60_000)
    model = page.get_by_label("base model")
    model.fill(str(workdir / "tiny-model"))
    model.press("Enter")
    expect(page.get_by_text(re.compile(r"parameters · 2 layers"))).to_be_visible()
    # A tiny uploaded dataset, checked and previewed as the model will see it.
    page.get_by_text("upload", exact=True).click()
    page.locator("input[type=file][accept*='.jsonl']").set_input_files(str(workdir / "tiny-data.json"))
    expect(page.get_by_text("24 rows read")).to_be_visible()
    page.get_by_role("button", name="Preview data").click()
    expect(page.get_by_text("24 rows · tokens per example")).to_be_visible()
    expect(page.get_by_text("Below is an instruction").first).to_be_attached()
    for label, value in [("max steps", "6"), ("batch size", "4"), ("micro batch size", "2"),
                         ("warmup steps", "0"), ("val size", "4")]:
        _set(page, label, value)
    boxes = page.get_by_role("checkbox", name=re.compile("builtin:math"))
    use_benchmark = boxes.count() > 0
    if use_benchmark:
        boxes.first.check()
        eval_limit = page.get_by_label("limit", exact=True).nth(1)  # the first is the data's row limit
        eval_limit.fill(str(BENCHMARK_LIMIT))
        eval_limit.press("Tab")
        _set(page, "max new tokens", "12")
    # An invalid learning rate is shown next to the form and nothing is submitted.
    _set(page, "learning rate", "-1")
    page.get_by_role("button", name="Launch").click()
    error = page.locator(".block.error-box", has_text="train.learning_rate")
    expect(error).to_be_visible()
    _shot(page, "1-train-invalid")
    # One click after the fix: a button's event runs once at a time (Gradio drops a click while the
    # previous one is pending), so a second quick click could be dropped on a loaded machine.
    _set(page, "learning rate", "0.001")
    page.get_by_role("button", name="Show config").click()
    expect(error).to_be_hidden(timeout=30_000)  # the spec is checked as the service would (its data read)
    expect(page.get_by_text("python -m jobs submit spec.json")).to_be_attached()
    _shot(page, "2-train-config")
    page.get_by_role("button", name="Launch").click()

    # ---- Jobs tab: selected at once; the job runs to the end; the loss chart is drawn.
    expect(page.get_by_role("tab", name="Jobs", selected=True)).to_be_visible()
    expect(page.get_by_role("heading", name=re.compile(r"#1 .* succeeded"))).to_be_visible(timeout=90_000)
    expect(page.locator(".js-plotly-plot .scatterlayer .trace").first).to_be_attached()
    expect(page.get_by_text("train loss").first).to_be_visible()
    _shot(page, "3-jobs")

    # ---- Chat tab: the trained adapter answers.
    page.get_by_role("tab", name="Chat").click()
    page.get_by_label("chat with").click()
    page.get_by_role("option", name=re.compile(r"^#1 ")).click()
    page.get_by_placeholder("Ask a question").fill("What is 3 + 4?")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("[data-testid=bot]").first
    expect(answer).to_be_visible(timeout=60_000)
    expect(answer).not_to_have_text(re.compile(r"^\s*(…|loading the model…)?\s*$"), timeout=60_000)
    _shot(page, "4-chat")

    # ---- Compare tab: the job has a row (evaluated after training, or on request here).
    page.get_by_role("tab", name="Compare").click()
    if not use_benchmark:
        pytest.skip("no benchmarks registered (core.evaluate missing): compare step not exercised")
    row = page.get_by_role("gridcell", name=re.compile(r"^#1 ")).first
    expect(row).to_be_visible(timeout=60_000)
    _shot(page, "5-compare")
    assert time.time() - start < 150
