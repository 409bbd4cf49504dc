"""Team logins: scrypt password hashes, the accounts the environment describes, and the command that
makes a hash.

Logins come from ``WORKBENCH_USERS_FILE`` (lines ``name:<hash>``) and/or ``WORKBENCH_USERS``
(``name:<hash>,name2:<hash>``), hashes made by ``python -m app.auth hash-password`` (stdlib scrypt;
the command is :func:`main`), and/or the single ``WORKBENCH_USER`` + ``WORKBENCH_PASSWORD`` pair (a
plain password in the environment). :func:`load_logins` reads them and refuses a half-configured or
malformed login with a one-line ``LoginError``; :class:`Logins` is the check behind Gradio's login page.

Standard library only, so the command line stays quick.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from core.deployment import DeploymentError

MIN_PASSWORD = 10


class LoginError(DeploymentError):
    """The login settings are wrong or incomplete: the server refuses to start."""


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
