"""Who is calling: identity on every handler call, the team login, visitor tokens and the login rate limit.

Gradio handlers can be reached over plain HTTP by ``fn_index`` even when they are hidden from the API
docs, so the page never trusts what the browser shows or hides: :func:`protect` wraps every event
function of a page, and each call resolves its :class:`~core.deployment.Actor` on the server from the
request Gradio received (the login cookie, the visitor cookie or the Hugging Face session). The actor
lives in a context variable for the duration of that call (around each step of a generator), and the
service the tabs hold is a :class:`ScopedService` that hands every method call to
``base.scoped(current_actor())`` — the service layer then checks owners and quotas.

Modes (``core.deployment``):

- ``local``: every call is :data:`~core.deployment.LOCAL_USER`; an optional login page
  (``WORKBENCH_USER`` + ``WORKBENCH_PASSWORD`` or a users file) only keeps strangers out.
- ``team``: a login is required; the actor is the login name (admins from ``WORKBENCH_ADMINS``).
- ``public``: a visitor is a token the server issued (a signed, http-only cookie set by
  :class:`VisitorCookieMiddleware`), ``anon:<id>``; on a Space with OAuth, a visitor who signed in
  with Hugging Face is ``hf:<user>``.

Logins come from ``WORKBENCH_USERS_FILE`` (lines ``name:<hash>``) and/or ``WORKBENCH_USERS``
(``name:<hash>,name2:<hash>``), hashes made by ``python -m app.auth hash-password`` (stdlib scrypt),
and/or the single ``WORKBENCH_USER`` + ``WORKBENCH_PASSWORD`` pair (a plain password in the
environment). A half-configured login refuses to start (:func:`startup_settings`). Failed logins are
limited per client address by :class:`LoginRateLimitMiddleware` (behind a reverse proxy, set uvicorn's
``FORWARDED_ALLOW_IPS`` to the proxy's address so the client address is the visitor's).

This module imports Gradio and Starlette only where they are used, so the command line stays quick.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import contextvars
import functools
import getpass
import hashlib
import hmac
import inspect
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from core.deployment import LOCAL_USER, Actor, Deployment, DeploymentError
from core.deployment import current as current_deployment
from core.deployment import using

MIN_PASSWORD = 10
VISITOR_COOKIE = "workbench_visitor"
VISITOR_MAX_AGE = 400 * 86400          # the longest lifetime browsers accept (Chrome caps cookies at 400 days)
BUILD_ACTOR = Actor("build:page")       # owns nothing: what the page sees while it is being built (team, public)
LOGIN_FAILURES, LOGIN_WINDOW_S = 5, 300.0

Identify = Callable[[Any, Deployment], Actor]   # (gradio.Request | None, deployment) -> Actor


class LoginError(DeploymentError):
    """The login settings are wrong or incomplete: the server refuses to start."""


# ----------------------------------------------------------------------------------- the acting user
_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("workbench_actor", default=None)


def current_actor(deployment: Deployment | None = None) -> Actor:
    """The actor of the handler call in progress.

    Outside any handler call: ``LOCAL_USER`` in local mode, else ``PermissionError("not signed in")``,
    so that code which forgot to pass through a protected handler fails closed.
    """
    actor = _actor.get()
    if actor is not None:
        return actor
    if (deployment or current_deployment()).local:
        return LOCAL_USER
    raise PermissionError("not signed in")


@contextlib.contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Run a block as ``actor`` (building the page, tests, the server's own scripts)."""
    token = _actor.set(actor)
    try:
        yield actor
    finally:
        _actor.reset(token)


class ScopedService:
    """What the tabs hold instead of the service: ``proxy.list_jobs()`` is
    ``base.scoped(current_actor()).list_jobs()``, resolved at every attribute access.

    ``proxy.actor`` is the current actor and ``proxy.deployment`` the mode's rules; everything else
    needs an actor (outside a handler call in team or public mode: ``PermissionError``).
    """

    __slots__ = ("_base", "_deployment")

    def __init__(self, base: Any, deployment: Deployment | None = None):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_deployment", deployment or getattr(base, "deployment", None)
                           or current_deployment())

    def __getattr__(self, name: str) -> Any:
        if name == "actor":
            return current_actor(self._deployment)
        if name == "deployment":
            return self._deployment
        return getattr(self._base.scoped(current_actor(self._deployment)), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a ScopedService is read-only: configure the service it wraps")

    def __repr__(self) -> str:
        return f"ScopedService({self._base!r}, mode={self._deployment.mode})"


# ------------------------------------------------------------------------------ identity per call
def _gradio_request() -> Any:
    """The ``gr.Request`` of the call in progress. Gradio sets it in its own context variable before
    calling an event function (and before each step of a generator), in the thread that runs it."""
    from gradio.context import LocalContext

    return LocalContext.request.get(None)


def _refuse(message: str) -> Exception:
    import gradio as gr

    return gr.Error(message, title="Not allowed", print_exception=False)


@contextlib.contextmanager
def _as(actor: Actor, deployment: Deployment) -> Iterator[None]:
    """The actor and the page's deployment for one handler call (or one step of a generator)."""
    token = _actor.set(actor)
    try:
        with using(deployment):
            yield
    finally:
        _actor.reset(token)


def _wrap(fn: Callable, resolve: Callable[[], Actor], deployment: Deployment) -> Callable:
    """``fn`` run as the actor ``resolve()`` gives for the request in progress, under ``deployment``
    (so the core's source rules are the page's, whatever this process's environment says).

    The wrapper is transparent to Gradio: the same signature (``functools.wraps``), the same kind
    (function, generator, coroutine, async generator), so ``gr.Progress``, ``gr.SelectData`` and
    ``gr.Request`` parameters of ``fn`` are filled exactly as before. (A wrapper declaring its own
    leading ``request: gr.Request`` parameter would not do: Gradio injects special arguments only
    into the leading positional parameters and stops at ``*args``, and for ``gr.render`` functions it
    inspects the render function, not ``BlockFunction.fn``.)
    """
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def wrapped_agen(*args, **kwargs):
            actor = resolve()
            with _as(actor, deployment):
                agen = fn(*args, **kwargs)
            try:
                while True:
                    with _as(actor, deployment):
                        try:
                            item = await agen.__anext__()
                        except StopAsyncIteration:
                            return
                    yield item
            finally:
                await agen.aclose()
        wrapper: Callable = wrapped_agen
    elif inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped_coro(*args, **kwargs):
            with _as(resolve(), deployment):
                return await fn(*args, **kwargs)
        wrapper = wrapped_coro
    elif inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapped_gen(*args, **kwargs):
            # Gradio runs each step in a worker thread of its own: the actor is set around each next().
            actor = resolve()
            with _as(actor, deployment):
                gen = fn(*args, **kwargs)
            try:
                while True:
                    with _as(actor, deployment):
                        try:
                            item = next(gen)
                        except StopIteration as stop:
                            return stop.value
                    yield item
            finally:
                gen.close()
        wrapper = wrapped_gen
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with _as(resolve(), deployment):
                return fn(*args, **kwargs)
        wrapper = wrapped
    wrapper.__workbench_protected__ = True  # type: ignore[attr-defined]
    return wrapper


def protect(demo: Any, deployment: Deployment | None = None, identify: Identify | None = None) -> int:
    """Make every event function of ``demo`` resolve its caller and run as that actor; hide them all
    from the API docs (hiding is not protection: they stay callable by ``fn_index``).

    Idempotent: functions already protected are left alone, so calling it again after more events
    were registered protects those too (``serve`` does). Without arguments it reuses the ones of the
    first call. Returns how many functions it wrapped.

    Functions that ``gr.render`` registers while a page is shown are not in ``demo.fns`` and are not
    wrapped: their service calls fail closed (``PermissionError``) outside local mode.
    """
    if deployment is None and identify is None and getattr(demo, "_workbench_identity", None):
        deployment, identify = demo._workbench_identity
    deployment = deployment or current_deployment()
    identify = identify or default_identify
    demo._workbench_identity = (deployment, identify)

    def resolve() -> Actor:
        try:
            actor = identify(_gradio_request(), deployment)
        except PermissionError as err:
            raise _refuse(str(err)) from None
        if not isinstance(actor, Actor):
            raise TypeError(f"identify returned {actor!r}, not an Actor")
        return actor

    wrapped = 0
    for block_fn in demo.fns.values():
        block_fn.api_visibility = "private"
        if block_fn.fn is None or getattr(block_fn.fn, "__workbench_protected__", False):
            continue
        block_fn.fn = _wrap(block_fn.fn, resolve, deployment)
        wrapped += 1
    return wrapped


def default_identify(request: Any, deployment: Deployment) -> Actor:
    """The actor of ``request`` (a ``gr.Request``) under ``deployment``; ``PermissionError`` when the
    request carries no identity the mode accepts."""
    if deployment.local:
        return LOCAL_USER
    if deployment.mode == "team":
        name = getattr(request, "username", None) if request is not None else None
        if not name:
            raise PermissionError("Not signed in: reload the page and sign in again.")
        return Actor(name, admin=deployment.is_admin(name))
    if deployment.oauth:
        user = hf_username(request)
        if user:
            return Actor(f"hf:{user}", admin=user in deployment.admins)
    visitor = visitor_tokens().verify(request_cookies(request).get(VISITOR_COOKIE))
    if visitor is None:
        raise PermissionError("This demo tells visitors apart by a cookie, and your browser sent none: "
                              "allow cookies for this site and reload the page.")
    return Actor(f"anon:{visitor}")


def request_cookies(request: Any) -> Mapping[str, str]:
    """The cookies of a ``gr.Request`` (live, or rebuilt from its saved fields)."""
    if request is None:
        return {}
    underlying = getattr(request, "request", None)
    if underlying is not None:
        return underlying.cookies
    try:
        return dict(request.cookies)
    except (AttributeError, TypeError):
        return {}


def hf_username(request: Any) -> str | None:
    """The Hugging Face user signed in with ``gr.LoginButton`` (OAuth on a Space), else None."""
    if request is None:
        return None
    try:
        from gradio.helpers import _session_from_request
        from gradio.oauth import _get_valid_oauth_info_from_session

        info = _get_valid_oauth_info_from_session(_session_from_request(request))
    except Exception:  # no session middleware, or Gradio moved these helpers: nobody is signed in
        return None
    user = ((info or {}).get("userinfo") or {}).get("preferred_username")
    return str(user) if user else None


def identity_line(deployment: Deployment, actor: Actor | None) -> str:
    """The header's mode and who you are: ``local``, ``team · signed in as alice (admin)``,
    ``public demo · you are visitor 1a2b3c4d``."""
    if deployment.local:
        return "local"
    mode = "team" if deployment.mode == "team" else "public demo"
    if actor is None:
        return mode
    admin = " (admin)" if actor.admin else ""
    if actor.name.startswith("anon:"):
        return f"{mode} · you are {actor.label}"
    return f"{mode} · signed in as {actor.label}{admin}"


# ----------------------------------------------------------------------------------- visitor tokens
class VisitorTokens:
    """Visitor tokens: ``<128-bit id, hex>.<HMAC-SHA256(secret, id), base64url>``. Knowing the token
    is the only way to act as that visitor; a token not signed with this server's secret is refused."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the visitor token secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, visitor: str) -> str:
        digest = hmac.new(self._secret, b"workbench-visitor:" + visitor.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self) -> str:
        visitor = secrets.token_hex(16)
        return f"{visitor}.{self._mac(visitor)}"

    def verify(self, token: str | None) -> str | None:
        """The visitor id of a valid token, else None."""
        if not token or len(token) > 200:
            return None
        visitor, _, mac = token.partition(".")
        if not re.fullmatch(r"[0-9a-f]{32}", visitor):
            return None
        return visitor if hmac.compare_digest(mac.encode(), self._mac(visitor).encode()) else None


def server_secret(env: Mapping[str, str] | None = None) -> bytes:
    """The key that signs visitor tokens: ``WORKBENCH_SECRET`` (at least 16 characters), else
    ``$WORKBENCH_HOME/secret.key``, made once (mode 0600) from 32 random bytes."""
    env = os.environ if env is None else env
    given = env.get("WORKBENCH_SECRET", "")
    if given.strip():
        if len(given.strip()) < 16:
            raise LoginError("WORKBENCH_SECRET is shorter than 16 characters")
        return given.strip().encode()
    from core.paths import workbench_home

    path = workbench_home() / "secret.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as err:
        raise LoginError(f"cannot create {path}: {err.strerror}") from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        secret = path.read_text().strip()
    except OSError as err:
        raise LoginError(f"cannot read {path}: {err.strerror}") from None
    if len(secret) < 16:
        raise LoginError(f"{path} holds no usable secret (delete it to make a new one)")
    return secret.encode()


_tokens_lock = threading.Lock()
_tokens: VisitorTokens | None = None


def visitor_tokens() -> VisitorTokens:
    """This process's visitor tokens: the secret is read once (``server_secret``), so the middleware
    that issues tokens and every handler call that checks them always agree."""
    global _tokens
    with _tokens_lock:
        if _tokens is None:
            _tokens = VisitorTokens(server_secret())
        return _tokens


def _cookie_header(scope: Mapping[str, Any], name: str) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v.strip().strip('"')
    return None


def _replace_cookie(headers: list, name: str, value: str) -> list:
    """``headers`` with every ``name`` cookie removed and ``name=value`` added, in one cookie header."""
    kept = []
    others = []
    for key, raw in headers:
        if key == b"cookie":
            kept += [p.strip() for p in raw.decode("latin-1").split(";")
                     if p.strip() and p.strip().partition("=")[0] != name]
        else:
            others.append((key, raw))
    return others + [(b"cookie", "; ".join(kept + [f"{name}={value}"]).encode("latin-1"))]


class VisitorCookieMiddleware:
    """Pure ASGI middleware: a request without a valid visitor cookie gets a new token, set in the
    response (``Set-Cookie``) and written into that same request's headers, so the handler of the very
    first request already sees it. A forged or tampered cookie is ignored and replaced.

    ``cross_site`` (a Space, whose page runs in an iframe on huggingface.co): ``SameSite=None; Secure;
    Partitioned``; otherwise ``SameSite=Lax``.
    """

    def __init__(self, app: Any, tokens: VisitorTokens | None = None, cross_site: bool = False):
        self.app = app
        self.tokens = tokens or visitor_tokens()
        flags = "SameSite=None; Secure; Partitioned" if cross_site else "SameSite=Lax"
        self.attributes = f"Path=/; Max-Age={VISITOR_MAX_AGE}; HttpOnly; {flags}"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or self.tokens.verify(_cookie_header(scope, VISITOR_COOKIE)):
            await self.app(scope, receive, send)
            return
        token = self.tokens.issue()
        scope = dict(scope)
        scope["headers"] = _replace_cookie(list(scope.get("headers", ())), VISITOR_COOKIE, token)
        set_cookie = f"{VISITOR_COOKIE}={token}; {self.attributes}".encode("latin-1")

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", ())) + [(b"set-cookie", set_cookie)]
            await send(message)

        await self.app(scope, receive, send_with_cookie if scope["type"] == "http" else send)


# ------------------------------------------------------------------------------ login rate limit
class LoginRateLimiter:
    """At most ``max_failures`` failed logins per client in a sliding ``window_s``; after that the
    client waits until its oldest failure leaves the window. Successful logins do not count."""

    def __init__(self, max_failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000):
        self.max_failures, self.window_s, self.clock, self.max_clients = max_failures, window_s, clock, max_clients
        self._failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> collections.deque:
        failures = self._failures.get(client) or collections.deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must wait before trying again (0: it may try now)."""
        with self._lock:
            now = self.clock()
            failures = self._recent(client, now)
            if not failures:
                self._failures.pop(client, None)
            if len(failures) < self.max_failures:
                return 0.0
            return max(failures[-self.max_failures] + self.window_s - now, 0.001)

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            failures = self._recent(client, now)
            failures.append(now)
            self._failures[client] = failures
            if len(self._failures) > self.max_clients:  # bounded memory: forget the stalest clients
                stale = sorted(self._failures, key=lambda c: self._failures[c][-1])
                for c in stale[: len(self._failures) - self.max_clients]:
                    del self._failures[c]


class LoginRateLimitMiddleware:
    """Pure ASGI middleware on Gradio's login route (``POST /login``): a client with too many recent
    failures gets ``429`` and a ``Retry-After`` header; a ``400``/``401`` answer counts as a failure.

    The client is the connection's address (uvicorn rewrites it from ``X-Forwarded-For`` only for the
    proxies in ``FORWARDED_ALLOW_IPS``).
    """

    def __init__(self, app: Any, limiter: LoginRateLimiter | None = None):
        self.app = app
        self.limiter = limiter or LoginRateLimiter()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                not scope.get("path", "").rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.retry_after(client)
        if wait > 0:
            minutes = max(1, math.ceil(wait / 60))
            body = json.dumps({"detail": f"Too many failed sign-ins from your address: try again in "
                                         f"{minutes} minute{'s' if minutes > 1 else ''}."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(math.ceil(wait)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_counting(message: dict) -> None:
            if message["type"] == "http.response.start" and message.get("status") in (400, 401):
                self.limiter.failed(client)
            await send(message)

        await self.app(scope, receive, send_counting)


def middleware_for(deployment: Deployment, logins: "Logins | None" = None,
                   limiter: LoginRateLimiter | None = None) -> list:
    """The Starlette ``Middleware`` list for ``demo.launch(app_kwargs={"middleware": ...})``."""
    from starlette.middleware import Middleware

    out = []
    if logins is not None:
        out.append(Middleware(LoginRateLimitMiddleware, limiter=limiter or LoginRateLimiter()))
    if deployment.public:
        out.append(Middleware(VisitorCookieMiddleware, tokens=visitor_tokens(), cross_site=deployment.on_space))
    return out


# ------------------------------------------------------------------------------------ passwords
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=128 * r * n * p + 2**20 * 16)


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$<salt b64>$<hash b64>`` of ``password`` (at least ``MIN_PASSWORD`` characters)."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """The parts of an encoded hash; ``ValueError`` saying what is wrong."""
    parts = encoded.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$n$r$p$salt$hash (made by python -m app.auth hash-password)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = (base64.b64decode(x, validate=True) for x in parts[4:6])
    except ValueError:
        raise ValueError("the scrypt parameters or the base64 salt/hash are malformed") from None
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt n must be a power of 2 up to 2^20, r in 1..32, p in 1..16")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the salt or the hash is too short")
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison; False if malformed)."""
    try:
        n, r, p, salt, digest = _parse_hash(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p)[: len(digest)], digest)


# ---------------------------------------------------------------------------------------- logins
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DUMMY_HASH = None


@dataclass
class Logins:
    """The accounts of the login page: ``users`` (name -> scrypt hash) and the optional plain
    ``WORKBENCH_USER``/``WORKBENCH_PASSWORD`` pair."""

    users: dict[str, str] = field(default_factory=dict)
    plain: tuple[str, str] | None = None

    @property
    def names(self) -> list[str]:
        return sorted(set(self.users) | ({self.plain[0]} if self.plain else set()))

    def check(self, name: str, password: str) -> bool:
        """Whether ``name``/``password`` is an account (an unknown name costs as much as a known one)."""
        global _DUMMY_HASH
        name = (name or "").strip()
        if self.plain and hmac.compare_digest(name.encode(), self.plain[0].encode()):
            return hmac.compare_digest(hashlib.sha256(password.encode()).digest(),
                                       hashlib.sha256(self.plain[1].encode()).digest())
        encoded = self.users.get(name)
        if encoded is None:
            _DUMMY_HASH = _DUMMY_HASH or hash_password("x" * MIN_PASSWORD)
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    def auth(self) -> Callable:
        """Gradio's ``auth`` callable: an ``async def`` (Gradio awaits only real coroutine functions),
        running scrypt in a worker thread so the event loop stays free."""
        async def check_login(username: str, password: str) -> bool:
            import anyio

            return await anyio.to_thread.run_sync(self.check, username, password)
        return check_login


def _add_user(users: dict[str, str], name: str, encoded: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise LoginError(f"{where}: user name {name!r} must be 1-64 letters, digits or . _ @ -")
    if name in users:
        raise LoginError(f"{where}: user {name!r} is defined twice")
    try:
        _parse_hash(encoded)
    except ValueError as err:
        raise LoginError(f"{where}: {err}") from None
    users[name] = encoded.strip()


def parse_users(text: str, source: str) -> dict[str, str]:
    """Users from a users file's text: ``name:<hash>`` per line, blank lines and ``#`` comments skipped."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep:
            raise LoginError(f"{source} line {number}: expected name:<hash>")
        _add_user(users, name.strip(), encoded, f"{source} line {number}")
    return users


def load_logins(env: Mapping[str, str] | None = None) -> Logins | None:
    """The login accounts the environment describes, None when it describes none; ``LoginError``
    (one line, naming the variable, file and line) when it is half-configured or malformed."""
    env = os.environ if env is None else env
    users: dict[str, str] = {}
    path = env.get("WORKBENCH_USERS_FILE", "").strip()
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise LoginError(f"WORKBENCH_USERS_FILE={path}: cannot read it ({reason})") from None
        users = parse_users(text, f"WORKBENCH_USERS_FILE {path}")
    for number, entry in enumerate(env.get("WORKBENCH_USERS", "").split(","), 1):
        if entry.strip():
            name, sep, encoded = entry.strip().partition(":")
            if not sep:
                raise LoginError(f"WORKBENCH_USERS entry {number}: expected name:<hash>")
            _add_user(users, name.strip(), encoded, f"WORKBENCH_USERS entry {number}")
    user, password = env.get("WORKBENCH_USER", "").strip(), env.get("WORKBENCH_PASSWORD", "")
    plain = None
    if bool(user) != bool(password):
        missing = "WORKBENCH_PASSWORD" if user else "WORKBENCH_USER"
        raise LoginError(f"{missing} is not set: set both WORKBENCH_USER and WORKBENCH_PASSWORD, or neither")
    if user:
        if not NAME.fullmatch(user):
            raise LoginError(f"WORKBENCH_USER={user!r} must be 1-64 letters, digits or . _ @ -")
        if len(password) < MIN_PASSWORD:
            raise LoginError(f"WORKBENCH_PASSWORD is shorter than {MIN_PASSWORD} characters")
        if user in users:
            raise LoginError(f"WORKBENCH_USER={user!r} is also in WORKBENCH_USERS_FILE/WORKBENCH_USERS")
        plain = (user, password)
    if not users and plain is None:
        if path:
            raise LoginError(f"WORKBENCH_USERS_FILE={path} holds no users")
        return None
    return Logins(users=users, plain=plain)


@dataclass(frozen=True)
class Startup:
    """What the server starts with: the deployment and its login (None: no login page)."""

    deployment: Deployment
    logins: Logins | None


def startup_settings(env: Mapping[str, str] | None = None) -> Startup:
    """Check the server's settings before anything starts; ``DeploymentError`` (``LoginError``) with a
    one-line reason when the server must refuse to start."""
    env = os.environ if env is None else env
    deployment = Deployment.from_env(env)
    logins = load_logins(env)
    if deployment.mode == "team" and logins is None:
        raise LoginError("team mode needs a login: set WORKBENCH_USERS_FILE or WORKBENCH_USERS (hashes from "
                         "python -m app.auth hash-password), or WORKBENCH_USER + WORKBENCH_PASSWORD")
    if deployment.public and logins is not None:
        raise LoginError("public mode has no password login (visitors are told apart by a browser token); "
                         "for a login use WORKBENCH_MODE=team")
    if deployment.public:
        server_secret(env)
    if deployment.oauth and not oauth_available():
        raise LoginError("this Space has OAuth (OAUTH_CLIENT_ID) but not its packages: put gradio[oauth] "
                         "instead of gradio in requirements.txt")
    return Startup(deployment, logins)


def oauth_available() -> bool:
    """Whether Gradio's "Sign in with Hugging Face" can work here (``gradio[oauth]`` installed)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("authlib", "itsdangerous"))


def space_home(env: dict | None = None, data: str = "/data") -> str | None:
    """On a Space (``SPACE_ID``) without ``WORKBENCH_HOME``: ``/data/workbench`` when the persistent
    disk ``/data`` is there and writable, so jobs survive a restart; else None (keep the default)."""
    env = os.environ if env is None else env
    if env.get("SPACE_ID", "").strip() and not env.get("WORKBENCH_HOME"):
        if os.path.isdir(data) and os.access(data, os.W_OK):
            return os.path.join(data, "workbench")
    return None


# ------------------------------------------------------------------------------------ command line
def _read_new_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m app.auth hash-password [name]``: print a users-file line for a new password."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "hash-password" or len(args) > 2:
        print("usage: python -m app.auth hash-password [name]\n"
              "  reads the password twice from the terminal (once from stdin when piped) and prints\n"
              "  name:<hash> for WORKBENCH_USERS_FILE (or <hash> alone without a name)", file=sys.stderr)
        return 2
    name = args[1] if len(args) == 2 else None
    if name is not None and not NAME.fullmatch(name):
        print(f"error: user name {name!r} must be 1-64 letters, digits or . _ @ -", file=sys.stderr)
        return 2
    try:
        encoded = hash_password(_read_new_password())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{name}:{encoded}" if name else encoded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
