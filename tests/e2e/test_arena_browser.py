"""The Arena tab in headless Chromium: one blind battle between two tiny models, one vote, and the
leaderboard moves from 0 to 1 vote with the preferred model on top.

``app.py`` runs as a subprocess (no worker: nothing is trained) with a pool of two base models made
beforehand through the service (the tiny LLaMA checkpoint and a copy of it). Skipped where Debian's
Chromium or the ``playwright`` package is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_browser import ARGS, CHROMIUM, REPO, SHOTS, _free_port, _wait_http

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

from core.deployment import LOCAL_USER  # noqa: E402
from jobs.service import JobService  # noqa: E402
from tests.tiny import build_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arena_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("arena-e2e")
    build_tiny_checkpoint(root / "tiny-a")
    shutil.copytree(root / "tiny-a", root / "tiny-b")
    home = root / "home"
    service = JobService(f"sqlite:///{home / 'workbench.db'}", home=home).scoped(LOCAL_USER)
    service.create_arena_pool("tiny pair", [f"base:{root / 'tiny-a'}", f"base:{root / 'tiny-b'}"])
    service.close()
    port = _free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(home), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1", "WORKBENCH_NO_WORKER": "1"}
    env.pop("WORKBENCH_USER", None)
    env.pop("WORKBENCH_DB_URL", None)
    log = root / "app.log"
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
            shutil.copy(log, SHOTS / "arena-app.log")


def test_one_vote_moves_the_leaderboard(arena_server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        page.goto(arena_server, wait_until="load")
        page.get_by_role("tab", name="Arena").click()
        summary = page.locator("#arena-summary")
        expect(summary).to_contain_text("0 votes in pool “tiny pair”", timeout=60_000)
        page.get_by_placeholder("A prompt both models answer").fill("What is 3 + 4?")
        page.get_by_role("button", name="Battle", exact=True).click()
        vote_a = page.get_by_role("button", name="A is better")
        expect(vote_a).to_be_enabled(timeout=90_000)
        expect(page.locator("#arena-reveal")).not_to_contain_text("base:")  # still blind
        page.screenshot(path=str(SHOTS / "arena-1-battle.png"), full_page=True)
        vote_a.click()
        expect(page.locator("#arena-reveal")).to_contain_text(re.compile(r"A was base: tiny-[ab]"))
        expect(summary).to_contain_text("1 votes in pool “tiny pair”")
        revealed = page.locator("#arena-reveal").inner_text()
        winner = re.search(r"A was base: (tiny-[ab])", revealed).group(1)
        first_row = page.locator("#arena-table tbody tr").first
        expect(first_row).to_contain_text(winner)
        expect(vote_a).to_be_disabled()
        page.screenshot(path=str(SHOTS / "arena-2-voted.png"), full_page=True)
        browser.close()
