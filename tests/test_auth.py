"""Identity on every call, the team login, visitor tokens, the login rate limit and refusing to start.

Servers run in this process on free ports (``app.ui.serve`` / ``start_app``) and are called the way a
browser calls them: ``POST /gradio_api/queue/join`` then the SSE stream ``/gradio_api/queue/data``, with
cookies kept by one ``httpx.Client`` per browser. No worker is started.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import httpx
import pytest

from app import auth, ui
from app.auth import (LOCAL_USER, Actor, LoginError, Logins, ScopedService, acting_as, current_actor, load_logins,
                      protect, startup_settings)
from app.logins import hash_password, verify_password
from app.visitors import LoginRateLimiter, VisitorCookieMiddleware, VisitorTokens
from core.deployment import Deployment, DeploymentError
from jobs.service import JobService

REPO = Path(__file__).resolve().parents[1]
PUBLIC, TEAM, LOCAL = (Deployment.for_mode(m) for m in ("public", "team", "local"))
GOOD = "correct horse battery"


# ------------------------------------------------------------------------------------------ helpers
class FakeService:
    """Records which actor every call was scoped to; ``whoami()`` answers the actor's name."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.seen: list[Actor] = []

    def scoped(self, actor: Actor):
        self.seen.append(actor)
        seen = self.seen

        class View:
            def whoami(self_view):
                return actor.name

            def count(self_view):
                return len(seen)
        return View()


class RecordingService(JobService):
    seen: list[Actor]

    def scoped(self, actor: Actor) -> JobService:
        self.seen.append(actor)
        return super().scoped(actor)


def call(client: httpx.Client, url: str, fn_index: int, data=(), session_hash: str | None = None) -> list:
    """Run event ``fn_index`` through the queue like the browser does; its final output data.
    A failed event raises ``RuntimeError`` with Gradio's message."""
    session_hash = session_hash or uuid.uuid4().hex[:11]
    joined = client.post(f"{url}gradio_api/queue/join",
                         json={"data": list(data), "fn_index": fn_index, "session_hash": session_hash})
    joined.raise_for_status()
    with client.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                if not message.get("success"):
                    raise RuntimeError((message.get("output") or {}).get("error") or "event failed")
                return message["output"]["data"]
    raise RuntimeError("the stream ended without a result")


def tiny_demo(service: ScopedService) -> tuple[gr.Blocks, dict[str, int]]:
    """One handler of each kind, all calling the scoped service; returns the demo and their fn indices."""
    def plain():
        return service.whoami()

    def generator():
        for i in range(3):
            yield f"{i}:{service.whoami()}"

    async def coroutine():
        return service.whoami()

    async def async_generator():
        for i in range(2):
            await asyncio.sleep(0)
            yield f"{i}:{service.whoami()}"

    with gr.Blocks() as demo:
        out = gr.Textbox()
        button = gr.Button()
        events = {"plain": button.click(plain, None, out),
                  "generator": button.click(generator, None, out),
                  "coroutine": button.click(coroutine, None, out),
                  "async_generator": button.click(async_generator, None, out),
                  "unqueued": button.click(plain, None, out, queue=False),
                  "header": button.click(lambda: ui.whoami(service.deployment), None, out)}
    return demo, {name: dep["id"] for name, dep in events.items()}


@pytest.fixture
def serve_tiny():
    """``serve_tiny(deployment, identify=None, logins=None, limiter=None) -> (url, fake, fns)``; closed after."""
    demos = []

    def start(deployment, identify=None, logins=None, limiter=None):
        fake = FakeService(deployment)
        demo, fns = tiny_demo(ScopedService(fake, deployment))
        protect(demo, deployment, identify)
        demos.append(demo)
        url = ui.serve(demo, deployment, logins, host="127.0.0.1", port=ui.free_port(), quiet=True, limiter=limiter)
        return url, fake, fns

    yield start
    for demo in demos:
        demo.close()


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "SPACE_ID", "OAUTH_"))}
    env.update(values)
    return env


# ------------------------------------------------------------------------------------------ passwords
def test_password_hash_round_trip_and_minimum_length():
    encoded = hash_password(GOOD)
    assert encoded.startswith("scrypt$32768$8$1$") and GOOD not in encoded
    assert verify_password(GOOD, encoded)
    assert not verify_password(GOOD + "!", encoded)
    assert not verify_password(GOOD, encoded.replace("scrypt", "bcrypt"))
    assert hash_password(GOOD) != encoded  # a fresh salt every time
    with pytest.raises(ValueError, match="at least 10"):
        hash_password("short")


def test_hash_password_command(tmp_path):
    run = subprocess.run([sys.executable, "-m", "app.auth", "hash-password", "alice"], cwd=REPO,
                         input=GOOD + "\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    name, _, encoded = run.stdout.strip().partition(":")
    assert name == "alice" and verify_password(GOOD, encoded)
    (tmp_path / "users").write_text(run.stdout)
    assert load_logins({"WORKBENCH_USERS_FILE": str(tmp_path / "users")}).check("alice", GOOD)
    short = subprocess.run([sys.executable, "-m", "app.auth", "hash-password"], cwd=REPO, input="tooshort\n",
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "at least 10" in short.stderr and not short.stdout


# --------------------------------------------------------------------------------------- login config
def test_users_file_errors_name_the_line(tmp_path):
    good = hash_password(GOOD)
    users = tmp_path / "users"
    users.write_text(f"# team\n\nalice:{good}\nbob {good}\n")
    with pytest.raises(LoginError, match=r"line 4: expected name:<hash>"):
        load_logins({"WORKBENCH_USERS_FILE": str(users)})
    users.write_text(f"alice:{good}\nbob:scrypt$1$2$3$x$y\n")
    with pytest.raises(LoginError, match=r"line 2: .*scrypt"):
        load_logins({"WORKBENCH_USERS_FILE": str(users)})
    users.write_text(f"alice:{good}\nalice:{good}\n")
    with pytest.raises(LoginError, match=r"line 2: user 'alice' is defined twice"):
        load_logins({"WORKBENCH_USERS_FILE": str(users)})
    users.write_text(f"al ice:{good}\n")
    with pytest.raises(LoginError, match=r"line 1: user name"):
        load_logins({"WORKBENCH_USERS_FILE": str(users)})
    with pytest.raises(LoginError, match="cannot read it"):
        load_logins({"WORKBENCH_USERS_FILE": str(tmp_path / "missing")})
    with pytest.raises(LoginError, match="entry 2"):
        load_logins({"WORKBENCH_USERS": f"alice:{good},bob"})
    users.write_text(f"alice:{good}\n")
    logins = load_logins({"WORKBENCH_USERS_FILE": str(users), "WORKBENCH_USERS": f"bob:{good}",
                          "WORKBENCH_USER": "carol", "WORKBENCH_PASSWORD": "plain password"})
    assert logins.names == ["alice", "bob", "carol"]
    assert logins.check("alice", GOOD) and logins.check("carol", "plain password")
    assert not logins.check("carol", GOOD) and not logins.check("dave", GOOD) and not logins.check("alice", "x")


@pytest.mark.parametrize("env, message", [
    ({"WORKBENCH_USER": "ada"}, "WORKBENCH_PASSWORD is not set"),
    ({"WORKBENCH_PASSWORD": "long enough pw"}, "WORKBENCH_USER is not set"),
    ({"WORKBENCH_USER": "ada", "WORKBENCH_PASSWORD": "secret"}, "shorter than 10"),
    ({"WORKBENCH_MODE": "team"}, "team mode needs a login"),
    ({"WORKBENCH_USERS_FILE": "/nonexistent/users"}, "cannot read it"),
    ({"WORKBENCH_MODE": "public", "WORKBENCH_USER": "ada", "WORKBENCH_PASSWORD": "long enough pw"},
     "public mode has no password login"),
    ({"WORKBENCH_MODE": "public", "WORKBENCH_SECRET": "short"}, "WORKBENCH_SECRET"),
    ({"WORKBENCH_MODE": "everyone"}, "WORKBENCH_MODE"),
])
def test_half_configured_settings_refuse_to_start(env, message):
    with pytest.raises(DeploymentError, match=message):
        startup_settings(env)


def test_settings_that_start():
    assert startup_settings({}).logins is None
    assert startup_settings({"WORKBENCH_USER": "ada", "WORKBENCH_PASSWORD": "long enough pw"}).logins.names == ["ada"]
    team = startup_settings({"WORKBENCH_MODE": "team", "WORKBENCH_USERS": f"ada:{hash_password(GOOD)}",
                             "WORKBENCH_ADMINS": "ada"})
    assert team.deployment.mode == "team" and team.deployment.is_admin("ada") and team.logins.names == ["ada"]
    assert startup_settings({"SPACE_ID": "me/demo"}).deployment.public


def test_app_py_refuses_to_start_with_one_line(tmp_path):
    env = clean_env(WORKBENCH_USER="ada", WORKBENCH_HOME=str(tmp_path / "home"), WORKBENCH_NO_WORKER="1")
    run = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == ("workbench: cannot start: WORKBENCH_PASSWORD is not set: set both "
                                  "WORKBENCH_USER and WORKBENCH_PASSWORD, or neither")
    assert "Traceback" not in run.stdout + run.stderr
    debug = subprocess.run([sys.executable, "app.py"], cwd=REPO, env={**env, "WORKBENCH_DEBUG": "1"},
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------------------- the acting user
def test_current_actor_outside_a_call_is_local_or_refused():
    assert current_actor(LOCAL) == LOCAL_USER
    for deployment in (TEAM, PUBLIC):
        with pytest.raises(PermissionError, match="not signed in"):
            current_actor(deployment)
        with acting_as(Actor("alice")):
            assert current_actor(deployment) == Actor("alice")
    proxy = ScopedService(FakeService(TEAM), TEAM)
    with pytest.raises(PermissionError):
        proxy.whoami()
    assert proxy.deployment is TEAM
    with acting_as(Actor("bob", admin=True)):
        assert proxy.whoami() == "bob" and proxy.actor == Actor("bob", admin=True)
    with pytest.raises(AttributeError):
        proxy.deployment = LOCAL


def test_wrappers_keep_what_gradio_inspects():
    def plain(a, b: int = 2, progress=gr.Progress()):
        return current_actor(TEAM).name

    def select(rows, evt: gr.SelectData, request: gr.Request):
        return current_actor(TEAM).name

    def gen(n):
        for i in range(n):
            yield current_actor(TEAM).name

    async def coro(x):
        return current_actor(TEAM).name

    async def agen(x):
        yield current_actor(TEAM).name

    alice = Actor("alice")
    for fn, kind in [(plain, inspect.isfunction), (select, inspect.isfunction), (gen, inspect.isgeneratorfunction),
                     (coro, inspect.iscoroutinefunction), (agen, inspect.isasyncgenfunction)]:
        wrapped = auth._wrap(fn, lambda: alice, LOCAL)
        assert kind(wrapped) and inspect.signature(wrapped) == inspect.signature(fn)
        assert wrapped.__name__ == fn.__name__ and gr.utils.get_type_hints(wrapped) == gr.utils.get_type_hints(fn)
    assert auth._wrap(plain, lambda: alice, LOCAL)(1) == "alice"
    assert asyncio.run(auth._wrap(coro, lambda: alice, LOCAL)(1)) == "alice"

    async def drain():
        return [x async for x in auth._wrap(agen, lambda: alice, LOCAL)(1)]
    assert asyncio.run(drain()) == ["alice"]
    # Gradio runs each step of a generator in a worker thread of its own, in a copy of the context
    steps = auth._wrap(gen, lambda: alice, LOCAL)(3)
    out = []
    for _ in range(3):
        t = threading.Thread(target=lambda: out.append(contextvars.copy_context().run(next, steps)))
        t.start()
        t.join()
    assert out == ["alice"] * 3
    with pytest.raises(PermissionError):
        current_actor(TEAM)  # nothing leaked out of the calls


# ---------------------------------------------------------------------------------- visitor tokens
def test_visitor_tokens_are_signed():
    tokens, other = VisitorTokens(b"k" * 32), VisitorTokens(b"j" * 32)
    token = tokens.issue()
    visitor = tokens.verify(token)
    assert visitor and len(visitor) == 32 and token.startswith(visitor)
    assert tokens.issue() != token
    assert other.verify(token) is None
    assert tokens.verify(visitor + "." + "A" * 43) is None
    assert tokens.verify(None) is None and tokens.verify("") is None and tokens.verify("x" * 500) is None
    flipped = ("0" if visitor[0] != "0" else "1") + token[1:]
    assert tokens.verify(flipped) is None


def test_server_secret_file_is_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    first = auth.server_secret({})
    path = tmp_path / "home" / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert auth.server_secret({}) == first
    assert auth.server_secret({"WORKBENCH_SECRET": "s" * 20}) == b"s" * 20


def test_public_visitors_are_told_apart_by_their_cookie(serve_tiny):
    url, fake, fns = serve_tiny(PUBLIC)
    with httpx.Client(timeout=60) as one, httpx.Client(timeout=60) as two:
        # the very first request already has an identity: the middleware put the new cookie into it
        a = call(one, url, fns["plain"])[0]
        b = call(two, url, fns["plain"])[0]
        assert a.startswith("anon:") and b.startswith("anon:") and a != b
        cookie = one.cookies[auth.VISITOR_COOKIE]
        assert auth.visitor_tokens().verify(cookie) == a[5:]
        # every kind of handler, a new page session (a reload), the un-queued route: the same visitor
        assert call(one, url, fns["generator"]) == [f"2:{a}"]
        assert call(one, url, fns["coroutine"]) == [a]
        assert call(one, url, fns["async_generator"]) == [f"1:{a}"]
        direct = one.post(f"{url}gradio_api/run/predict", json={"data": [], "fn_index": fns["unqueued"],
                                                                "session_hash": "reload"})
        assert direct.json()["data"] == [a]
        assert call(one, url, fns["header"]) == [f"public demo · you are visitor {a[5:13]}"]
        page = one.get(url)
        assert page.status_code == 200 and "set-cookie" not in page.headers  # a valid cookie is kept
    # the same cookie in another client (a browser after a restart) is the same visitor
    jar = httpx.Cookies()
    jar.set(auth.VISITOR_COOKIE, cookie, domain="127.0.0.1", path="/")
    with httpx.Client(timeout=60, cookies=jar) as again:
        assert call(again, url, fns["plain"]) == [a]
    assert {actor.name for actor in fake.seen} == {a, b}
    assert all(not actor.admin for actor in fake.seen)


def test_a_tampered_cookie_gets_a_new_identity(serve_tiny):
    url, fake, fns = serve_tiny(PUBLIC)
    with httpx.Client(timeout=60) as honest:
        victim = call(honest, url, fns["plain"])[0]
        token = honest.cookies[auth.VISITOR_COOKIE]
    visitor, _, mac = token.partition(".")
    forged = [visitor + "." + mac[::-1], visitor + ".", visitor, "0" * 32 + "." + mac, "garbage"]
    for bad in forged:
        jar = httpx.Cookies()
        jar.set(auth.VISITOR_COOKIE, bad, domain="127.0.0.1", path="/")
        with httpx.Client(timeout=60, cookies=jar) as attacker:
            got = call(attacker, url, fns["plain"])[0]
            assert got.startswith("anon:") and got != victim
            assert attacker.cookies[auth.VISITOR_COOKIE] != bad  # replaced by a valid one
            assert auth.visitor_tokens().verify(attacker.cookies[auth.VISITOR_COOKIE]) == got[5:]


def test_hidden_handlers_are_reachable_by_fn_index_and_still_identify(serve_tiny):
    url, fake, fns = serve_tiny(PUBLIC)
    with httpx.Client(timeout=60) as client:
        info = client.get(f"{url}gradio_api/info").json()
        assert not info.get("named_endpoints") and not info.get("unnamed_endpoints")
        config = client.get(f"{url}config").json()
        assert {d["api_visibility"] for d in config["dependencies"]} == {"private"}
        # hiding is not protection: the raw HTTP call still runs, as the caller it identified
        who = call(client, url, fns["plain"])[0]
    assert fake.seen and fake.seen[-1] == Actor(who)


def test_identify_seam_injects_an_oauth_like_identity(serve_tiny):
    url, fake, fns = serve_tiny(PUBLIC, identify=lambda request, deployment: Actor("hf:bob", admin=True))
    with httpx.Client(timeout=60) as client:
        assert call(client, url, fns["plain"]) == ["hf:bob"]
        assert call(client, url, fns["header"]) == ["public demo · signed in as bob (admin)"]
    assert set(fake.seen) == {Actor("hf:bob", admin=True)}


def test_identify_refusal_is_a_clear_error(serve_tiny):
    def nobody(request, deployment):
        raise PermissionError("Not signed in: reload the page and sign in again.")
    url, fake, fns = serve_tiny(TEAM, identify=nobody)
    with httpx.Client(timeout=60) as client, pytest.raises(RuntimeError, match="Not signed in"):
        call(client, url, fns["plain"])
    assert fake.seen == []


class _Req:
    def __init__(self, session=None, cookies=None, username=None):
        self.request = type("R", (), {"scope": {"session": session or {}}, "cookies": cookies or {}})()
        self.username = username


def test_default_identify_by_mode():
    assert auth.default_identify(None, LOCAL) == LOCAL_USER
    team = Deployment.for_mode("team", admins=frozenset({"bob"}))
    assert auth.default_identify(_Req(username="alice"), team) == Actor("alice")
    assert auth.default_identify(_Req(username="bob"), team) == Actor("bob", admin=True)
    with pytest.raises(PermissionError, match="Not signed in"):
        auth.default_identify(_Req(), team)
    session = {"oauth_info": {"userinfo": {"preferred_username": "bob"}, "expires_at": time.time() + 60}}
    token = auth.visitor_tokens().issue()
    cookies = {auth.VISITOR_COOKIE: token}
    space = Deployment.for_mode("public", oauth=True, on_space=True, admins=frozenset({"bob"}))
    assert auth.default_identify(_Req(session, cookies), space) == Actor("hf:bob", admin=True)
    visitor = Actor("anon:" + token.partition(".")[0])
    assert auth.default_identify(_Req({}, cookies), space) == visitor
    assert auth.default_identify(_Req(session, cookies), PUBLIC) == visitor  # no OAuth: the session is ignored
    expired = {"oauth_info": {"userinfo": {"preferred_username": "bob"}, "expires_at": time.time() - 1}}
    assert auth.default_identify(_Req(expired, cookies), space) == visitor
    with pytest.raises(PermissionError, match="cookie"):
        auth.default_identify(_Req({}, {auth.VISITOR_COOKIE: "forged"}), PUBLIC)


def test_identity_line():
    assert auth.identity_line(LOCAL, LOCAL_USER) == "local"
    assert auth.identity_line(TEAM, Actor("alice", admin=True)) == "team · signed in as alice (admin)"
    assert auth.identity_line(PUBLIC, Actor("anon:1a2b3c4d5e6f")) == "public demo · you are visitor 1a2b3c4d"
    assert auth.identity_line(PUBLIC, None) == "public demo"


# ------------------------------------------------------------------------------------- team login
def _login(client: httpx.Client, url: str, name: str, password: str, client_ip: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": client_ip} if client_ip else {}
    return client.post(f"{url}login", data={"username": name, "password": password}, headers=headers)


def test_team_logins_are_different_actors(serve_tiny):
    team = Deployment.for_mode("team", admins=frozenset({"bob"}))
    logins = Logins(users={"alice": hash_password(GOOD)}, plain=("bob", "bob's long password"))
    url, fake, fns = serve_tiny(team, logins=logins)
    with httpx.Client(timeout=60) as alice, httpx.Client(timeout=60) as bob, httpx.Client(timeout=60) as stranger:
        assert stranger.post(f"{url}gradio_api/queue/join",
                             json={"data": [], "fn_index": fns["plain"], "session_hash": "s"}).status_code == 401
        assert _login(stranger, url, "alice", "wrong password").status_code == 400
        assert _login(alice, url, "alice", GOOD).status_code == 200
        assert _login(bob, url, "bob", "bob's long password").status_code == 200
        assert call(alice, url, fns["plain"]) == ["alice"]
        assert call(bob, url, fns["generator"]) == ["2:bob"]
        assert call(alice, url, fns["header"]) == ["team · signed in as alice · [sign out](logout)"]
        assert call(bob, url, fns["header"]) == ["team · signed in as bob (admin) · [sign out](logout)"]
    assert set(fake.seen) == {Actor("alice"), Actor("bob", admin=True)}


def test_login_rate_limiter_window():
    now = [1000.0]
    limiter = LoginRateLimiter(max_failures=5, window_s=300, clock=lambda: now[0])
    for i in range(5):
        assert limiter.retry_after("1.2.3.4") == 0
        limiter.failed("1.2.3.4")
        now[0] += 10
    assert limiter.retry_after("1.2.3.4") == pytest.approx(250)
    assert limiter.retry_after("5.6.7.8") == 0
    now[0] += 249
    assert limiter.retry_after("1.2.3.4") > 0
    now[0] += 2  # the first failure left the window: one more try
    assert limiter.retry_after("1.2.3.4") == 0
    limiter.failed("1.2.3.4")
    assert limiter.retry_after("1.2.3.4") > 0
    small = LoginRateLimiter(max_failures=1, window_s=60, clock=lambda: now[0], max_clients=3)
    for i in range(10):
        small.failed(f"10.0.0.{i}")
    assert len(small._failures) == 3


def test_failed_logins_get_429_per_client(serve_tiny):
    limiter = LoginRateLimiter()
    logins = Logins(plain=("ada", "ada's long password"))
    url, fake, fns = serve_tiny(LOCAL, logins=logins, limiter=limiter)
    with httpx.Client(timeout=60) as client:
        # the local login is only a gate: whoever signs in is the local user
        assert _login(client, url, "ada", "ada's long password", "10.0.0.1").status_code == 200
        assert call(client, url, fns["plain"]) == ["local"]
        for _ in range(5):
            assert _login(client, url, "ada", "guess", "10.0.0.1").status_code == 400
        blocked = _login(client, url, "ada", "ada's long password", "10.0.0.1")
        assert blocked.status_code == 429 and "Too many failed sign-ins" in blocked.json()["detail"]
        assert 0 < int(blocked.headers["retry-after"]) <= 300
        # another address is not affected, and a success does not count as a failure
        assert _login(client, url, "ada", "guess", "10.0.0.2").status_code == 400
        assert _login(client, url, "ada", "ada's long password", "10.0.0.2").status_code == 200
    assert limiter.retry_after("10.0.0.2") == 0 and len(limiter._failures["10.0.0.2"]) == 1


# ------------------------------------------------------------------------------------- the whole page
@pytest.fixture(scope="module")
def public_page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("public-page")
    service = RecordingService(f"sqlite:///{tmp / 'jobs.db'}", home=tmp / "home", deployment=PUBLIC)
    service.seen = []
    url, close = ui.start_app(service, PUBLIC)
    config = httpx.get(f"{url}config", timeout=60).json()
    who = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "workbench-identity")
    loads = [d["id"] for d in config["dependencies"] if d["outputs"] == [who]]
    yield url, service, loads[0], config
    close()
    service.close()


def test_the_page_shows_the_mode_and_reaches_the_service_as_the_visitor(public_page):
    url, service, who_fn, config = public_page
    assert {d["api_visibility"] for d in config["dependencies"]} == {"private"}
    assert not any(c.get("type") == "loginbutton" for c in config["components"])
    assert {a.name for a in service.seen} <= {"build:page"}  # building the page saw no one's jobs
    with httpx.Client(timeout=60) as one, httpx.Client(timeout=60) as two:
        line_one = call(one, url, who_fn)[0]
        line_two = call(two, url, who_fn)[0]
        visitor = one.cookies[auth.VISITOR_COOKIE].partition(".")[0]
        assert line_one == f"public demo · you are visitor {visitor[:8]}" and line_one != line_two
        # every page-load handler that reads jobs asks the service as this visitor
        before = len(service.seen)
        initial = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
        for dep in config["dependencies"]:
            # (the Train form's estimate, with dozens of inputs, reads no jobs and converts a model: skipped)
            if dep["targets"] and dep["targets"][0][1] == "load" and len(dep["inputs"]) < 20:
                call(one, url, dep["id"], [initial.get(i) for i in dep["inputs"]])
        seen = service.seen[before:]
    assert seen and {a.name for a in seen} == {f"anon:{visitor}"}


def test_build_demo_offers_no_login_button_without_oauth(tmp_path):
    service = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home", deployment=TEAM)
    demo = ui.build_demo(service)
    assert not any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
    assert all(getattr(f.fn, "__workbench_protected__", False) for f in demo.fns.values() if f.fn)
    with pytest.raises(ValueError, match="other rules"):
        ui.build_demo(service, PUBLIC)
    service.close()


def test_launch_options_by_mode(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    local = ui.launch_options(LOCAL, None)
    assert local["server_name"] == "127.0.0.1" and "auth" not in local and "enable_monitoring" not in local
    team = ui.launch_options(TEAM, Logins(plain=("ada", "ada's long password")))
    assert team["server_name"] == "0.0.0.0" and team["enable_monitoring"] is False
    assert inspect.iscoroutinefunction(team["auth"])  # Gradio awaits only real coroutine functions
    assert asyncio.run(team["auth"]("ada", "ada's long password")) and not asyncio.run(team["auth"]("ada", "no"))
    assert ui.launch_options(PUBLIC, None)["max_file_size"] == PUBLIC.limits.upload_file_bytes
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.1.2.3")
    assert ui.launch_options(LOCAL, None)["server_name"] == "10.1.2.3"


# ------------------------------------------------------------------------------------------- a Space
def test_the_visitor_cookie_is_cross_site_on_a_space():
    async def app(scope, receive, send):
        # answers the cookie header the application behind the middleware received
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": dict(scope["headers"]).get(b"cookie", b"")})

    async def get(middleware, cookie=None):
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://space") as client:
            return await client.get("/", headers={"cookie": cookie} if cookie else {})

    tokens = VisitorTokens(b"s" * 32)
    on_space = asyncio.run(get(VisitorCookieMiddleware(app, tokens, cross_site=True), "theme=dark"))
    set_cookie = on_space.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=None; Secure; Partitioned" in set_cookie
    token = set_cookie.split(";")[0].partition("=")[2]
    assert tokens.verify(token) and on_space.text == f"theme=dark; {auth.VISITOR_COOKIE}={token}"
    off_space = asyncio.run(get(VisitorCookieMiddleware(app, tokens)))
    assert "SameSite=Lax" in off_space.headers["set-cookie"] and "Secure" not in off_space.headers["set-cookie"]
    kept = asyncio.run(get(VisitorCookieMiddleware(app, tokens), f"{auth.VISITOR_COOKIE}={token}"))
    assert "set-cookie" not in kept.headers and kept.text == f"{auth.VISITOR_COOKIE}={token}"


def test_space_home_and_oauth_packages(tmp_path, monkeypatch):
    data = tmp_path / "data"
    assert auth.space_home({"SPACE_ID": "me/demo"}, str(data)) is None  # no persistent disk
    data.mkdir()
    assert auth.space_home({"SPACE_ID": "me/demo"}, str(data)) == str(data / "workbench")
    assert auth.space_home({"SPACE_ID": "me/demo", "WORKBENCH_HOME": "/x"}, str(data)) is None
    assert auth.space_home({}, str(data)) is None
    space = {"SPACE_ID": "me/demo", "OAUTH_CLIENT_ID": "abc"}
    monkeypatch.setattr(auth, "oauth_available", lambda: False)
    with pytest.raises(LoginError, match=r"gradio\[oauth\]"):
        startup_settings(space)
    monkeypatch.setattr(auth, "oauth_available", lambda: True)
    assert startup_settings(space).deployment.oauth
