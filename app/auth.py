"""Who is calling: the identity of every handler call, and the server's start-up checks.

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
  :class:`~app.visitors.VisitorCookieMiddleware`), ``anon:<id>``; on a Space with OAuth, a visitor who
  signed in with Hugging Face is ``hf:<user>``.

The accounts, password hashes and ``python -m app.auth hash-password`` are ``app.logins``; visitor
tokens, the server secret, the cookie middleware and the login rate limit are ``app.visitors`` (their
names are importable from here too). :func:`startup_settings` checks them all before the server
starts: a half-configured login refuses to start.

This module imports Gradio and Starlette only where they are used, so the command line stays quick.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from core.deployment import LOCAL_USER, Actor, Deployment
from core.deployment import current as current_deployment
from core.deployment import using

from .logins import LoginError, Logins, load_logins, main
from .visitors import VISITOR_COOKIE, server_secret, visitor_tokens

BUILD_ACTOR = Actor("build:page")       # owns nothing: what the page sees while it is being built (team, public)

Identify = Callable[[Any, Deployment], Actor]   # (gradio.Request | None, deployment) -> Actor


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


# ------------------------------------------------------------------------------------ start-up
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


if __name__ == "__main__":
    sys.exit(main())
