"""Visitors and the login page's guard: visitor tokens, the server secret, and the two ASGI middlewares.

In ``public`` mode a visitor is a token the server issued (:class:`VisitorTokens`, signed with
:func:`server_secret`), kept in a signed, http-only cookie that :class:`VisitorCookieMiddleware` sets;
``app.auth.default_identify`` turns it into the actor ``anon:<id>``. Failed logins are limited per
client address by :class:`LoginRateLimiter` and :class:`LoginRateLimitMiddleware` (behind a reverse
proxy, set uvicorn's ``FORWARDED_ALLOW_IPS`` to the proxy's address so the client address is the
visitor's). :func:`middleware_for` is the list a mode needs.

Starlette is imported only where it is used, so the command line stays quick.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from typing import Any, Callable, Mapping

from core.deployment import Deployment

from .logins import LoginError, Logins

VISITOR_COOKIE = "workbench_visitor"
VISITOR_MAX_AGE = 400 * 86400          # the longest lifetime browsers accept (Chrome caps cookies at 400 days)
LOGIN_FAILURES, LOGIN_WINDOW_S = 5, 300.0


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


def middleware_for(deployment: Deployment, logins: Logins | None = None,
                   limiter: LoginRateLimiter | None = None) -> list:
    """The Starlette ``Middleware`` list for ``demo.launch(app_kwargs={"middleware": ...})``."""
    from starlette.middleware import Middleware

    out = []
    if logins is not None:
        out.append(Middleware(LoginRateLimitMiddleware, limiter=limiter or LoginRateLimiter()))
    if deployment.public:
        out.append(Middleware(VisitorCookieMiddleware, tokens=visitor_tokens(), cross_site=deployment.on_space))
    return out
