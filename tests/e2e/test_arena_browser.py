"""The Arena tab in headless Chromium: one blind battle between two tiny models, one vote, and the
leaderboard moves from 0 to 1 vote with the preferred model on top.

``app.py`` runs as a subprocess (no worker: nothing is trained) with a pool of two base models made
beforehand through the service (the tiny LLaMA checkpoint and a copy of it). Skipped where Debian's
Chromium or the ``playwright`` package is missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_browser import ARGS, CHROMIUM, SHOTS, running_app

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
    with running_app(home, root / "arena-app.log", worker=False) as url:
        yield url


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
