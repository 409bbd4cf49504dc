"""The running app as strangers see it: two visitors of a public workbench (and two users of a team one)
call its handlers over plain HTTP, by ``fn_index`` (every handler is hidden from the API, and hidden
is not protected: gradio issue #13051). Neither sees, downloads, cancels, deletes or chats with the
other's job; server paths, local hub paths and remote code are refused; the fourth launch hits the
quota. No worker runs: jobs stay queued, which is all these checks need.
"""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import auth, ui
from app.auth import Logins
from app.logins import hash_password
from core.deployment import Deployment
from jobs.service import JobService
from tests.test_auth import call

PUBLIC = Deployment.for_mode("public")
TEAM = Deployment.for_mode("team")


class Page:
    """The served page's config, and its handlers found by the button or widget that fires them."""

    def __init__(self, url: str, client: httpx.Client | None = None):
        self.url = url
        self.config = (client or httpx).get(f"{url}config", timeout=60).json()
        self.components = {c["id"]: c for c in self.config["components"]}

    def component(self, label: str, kind: str | None = None) -> int:
        found = [i for i, c in self.components.items()
                 if (c.get("props", {}).get("label") == label or c.get("props", {}).get("value") == label)
                 and (kind is None or c.get("type") == kind)]
        assert found, f"no component {label!r}"
        return found[0]

    def event(self, label: str, trigger: str = "click", kind: str | None = "button") -> dict[str, Any]:
        target = self.component(label, kind)
        for dep in self.config["dependencies"]:
            if [target, trigger] in [list(t) for t in dep["targets"]]:
                return dep
        raise AssertionError(f"no {trigger} event on {label!r}")

    def initial(self, dep: dict[str, Any], **changes: Any) -> list[Any]:
        """The event's inputs as a fresh page holds them, with some widgets changed (by label)."""
        by_id = {self.component(label): value for label, value in changes.items()}
        return [by_id.get(i, self.components[i].get("props", {}).get("value")) for i in dep["inputs"]]


def message(update: Any) -> str:
    return update.get("value", "") if isinstance(update, dict) else str(update)


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("public-app")
    service = JobService(f"sqlite:///{tmp / 'jobs.db'}", home=tmp / "home", deployment=PUBLIC)
    url, close = ui.start_app(service, PUBLIC)
    yield Page(url), service
    close()
    service.close()


def launch(page: Page, client: httpx.Client, service: JobService, **changes: Any) -> tuple[str, int | None]:
    """Click Launch: (the error box's text, the id of the job queued or None). The job id itself stays
    in the session's server-side state, so it is read from the database."""
    dep = page.event("Launch")
    before = {j["id"] for j in service.list_jobs()}
    box, _ = call(client, page.url, dep["id"], page.initial(dep, **changes))
    new = {j["id"] for j in service.list_jobs()} - before
    assert len(new) <= 1
    return message(box), (new.pop() if new else None)


def test_two_visitors_cannot_touch_each_others_jobs(public_app):
    page, service = public_app
    with httpx.Client(timeout=120) as alice, httpx.Client(timeout=120) as bob:
        error, job = launch(page, alice, service, **{"job name": "alice's secret job", "max steps": 3})
        assert error == "" and isinstance(job, int), error
        owner = service.get(job)["owner"]
        assert owner == f"anon:{alice.cookies[auth.VISITOR_COOKIE].partition('.')[0]}"

        refresh = page.event("↻ Refresh")  # each browser tab is one session: its job list is its own
        table = call(bob, page.url, refresh["id"], [None, [], 0.0, False, {}], session_hash="bob-session")
        assert "alice's secret job" not in json.dumps(table)
        mine = call(alice, page.url, refresh["id"], [None, [], 0.0, False, {}], session_hash="alice-sess")
        assert "alice's secret job" in json.dumps(mine)
        with pytest.raises(RuntimeError, match="not in the list of choices"):  # gradio's own check comes first
            call(bob, page.url, refresh["id"], [job, [], 0.0, False, {}], session_hash="bob-session")

        for label in ("Cancel", "Resume", "Yes, delete", "adapter (workbench format)", "Clone into Train tab"):
            dep = page.event(label)
            with pytest.raises(RuntimeError, match="not in the list of choices"):
                call(bob, page.url, dep["id"], [job], session_hash="bob-session")
        assert service.get(job)["status"] == "queued"  # nothing bob sent changed it

        service.finish(job, "succeeded", only_if=None)  # as if trained: an adapter to chat with
        adapter = Path(service.get(job)["out_dir"]) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
        chat_with = page.component("chat with", "dropdown")
        options = next(d for d in page.config["dependencies"]
                       if chat_with in d["outputs"] and ["load"] == [t[1] for t in d["targets"]][:1])
        for who, session, sees in ((bob, "bob-session", False), (alice, "alice-sess", True)):
            listed = call(who, page.url, options["id"], page.initial(options), session_hash=session)
            assert (f"job:{job}" in json.dumps(listed)) is sees
        send = page.event("Send")
        with pytest.raises(RuntimeError, match="not in the list of choices"):
            call(bob, page.url, send["id"], page.initial(send, **{"chat with": f"job:{job}"}),
                 session_hash="bob-session")


def test_server_paths_local_hub_paths_and_remote_code_are_refused(public_app, tmp_path):
    page, service = public_app
    secret = tmp_path / "users.json"
    secret.write_text(json.dumps([{"instruction": "password", "output": "hunter2"}]))
    preview = page.event("Preview data")
    cases = [
        {"source": "server path", "file on the server": str(secret)},
        {"source": "server path", "file on the server": str(tmp_path / "missing.json")},
        {"source": "hub id", "hub dataset id": str(tmp_path)},
        {"source": "hub id", "hub dataset id": "../../etc"},
        {"source": "upload", "data.upload": None},
    ]
    with httpx.Client(timeout=120) as visitor:
        answers = []
        for changes in cases:
            changes = {k: v for k, v in changes.items() if k != "data.upload"}
            box, rows, _ = call(visitor, page.url, preview["id"], page.initial(preview, **changes))
            assert rows in ([], {"headers": [], "data": []}) or "hunter2" not in json.dumps(rows)
            answers.append(message(box))
        assert all(a for a in answers) and not any("hunter2" in a for a in answers)
        # a file that exists and one that does not get the same words: no oracle of the server's files
        assert answers[0].replace(str(secret), "X") == answers[1].replace(str(tmp_path / "missing.json"), "X")
        error, job = launch(page, visitor, service, **{"base model": str(tmp_path)})
        assert "not found or not allowed" in error and job is None
        error, job = launch(page, visitor, service, **{"trust remote code": True})
        assert "never runs" in error and job is None


def test_the_fourth_launch_hits_the_quota(public_app):
    page, service = public_app
    with httpx.Client(timeout=120) as visitor:
        ids = [launch(page, visitor, service, **{"max steps": 2})[1] for _ in range(3)]
        assert all(isinstance(i, int) for i in ids)
        error, job = launch(page, visitor, service, **{"max steps": 2})
        assert "3 queued or running jobs" in error and job is None
        error, job = launch(page, visitor, service, **{"max steps": 5000})
        assert "max_steps" in error and job is None


def test_the_database_and_runs_are_not_files_the_page_serves(public_app):
    page, service = public_app
    for path in (service.db.engine.url.database, service.home / "secret.key"):
        answer = httpx.get(f"{page.url}gradio_api/file={path}", timeout=30)
        assert answer.status_code in (403, 404), path


@pytest.fixture(scope="module")
def team_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team-app")
    service = JobService(f"sqlite:///{tmp / 'jobs.db'}", home=tmp / "home", deployment=TEAM)
    logins = Logins({"alice": hash_password("alice-password"), "bob": hash_password("bob-password")})
    url, close = ui.start_app(service, TEAM, logins=logins)
    with closing(signed_in(url, "alice")) as client:  # the page's config is for signed-in users only
        page = Page(url, client)
    yield page, service
    close()
    service.close()


def signed_in(url: str, name: str) -> httpx.Client:
    client = httpx.Client(timeout=120)
    answer = client.post(f"{url}login", data={"username": name, "password": f"{name}-password"})
    assert answer.status_code == 200, answer.text
    return client


def test_two_team_users_see_their_own_jobs_only(team_app):
    page, service = team_app
    with closing(signed_in(page.url, "alice")) as alice, closing(signed_in(page.url, "bob")) as bob, \
            httpx.Client(timeout=60) as stranger:
        error, job = launch(page, alice, service, **{"job name": "alice's job", "max steps": 3})
        assert error == "" and service.get(job)["owner"] == "alice"
        refresh = page.event("↻ Refresh")
        fresh = [None, [], 0.0, False, {}]
        assert "alice's job" not in json.dumps(call(bob, page.url, refresh["id"], fresh, session_hash="bob-session"))
        assert "alice's job" in json.dumps(call(alice, page.url, refresh["id"], fresh, session_hash="alice-sess"))
        cancel = page.event("Cancel")
        with pytest.raises(RuntimeError):
            call(bob, page.url, cancel["id"], [job], session_hash="bob-session")
        assert service.get(job)["status"] == "queued"
        with pytest.raises(Exception):  # no login, no call
            call(stranger, page.url, refresh["id"], fresh)
        call(alice, page.url, cancel["id"], [job], session_hash="alice-sess")
        assert service.get(job)["status"] == "cancelled"
