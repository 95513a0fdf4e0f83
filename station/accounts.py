"""People at the station: accounts with roles, passwords hashed with argon2, browser sessions with a CSRF token,
per-user API tokens for scripts. What a person does (a label, an approval) is recorded under the name they
authenticated as, never a name a request carries.

Roles, each including the ones before it: `operator` labels frames; `approver` also retrains and approves gates;
`admin` also manages accounts. Tokens and session ids are random (secrets.token_urlsafe) and stored only as their
SHA-256, so a copy of the database lets nobody in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError

if TYPE_CHECKING:
    from bouncer.station.store import Store

ROLES = ("operator", "approver", "admin")
NAME = schemas.whole(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SESSION_S = 12 * 3600  # a browser session lasts a shift
MIN_PASSWORD = 8


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: a person (`via` "session" or "token"), the station's shared token, or anyone on
    loopback when the station has no accounts and no token (the demo)."""

    name: str
    role: str
    via: str
    csrf: str | None = None  # a session's: state-changing requests must echo it

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _hasher():
    try:
        from argon2 import PasswordHasher
    except ImportError:
        raise BouncerError("accounts need argon2-cffi (the [station] extra): pip install 'bouncer[station]'") from None
    return PasswordHasher()


class Accounts:
    def __init__(self, store: Store) -> None:
        self.store = store

    def any(self) -> bool:
        return bool(self.store.rows("SELECT 1 FROM users LIMIT 1"))

    def add(self, name: str, role: str, password: str) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise BouncerError(f"user name {name!r}: 1-64 letters, digits, _ . @ -, starting with a letter or digit")
        if role not in ROLES:
            raise BouncerError(f"role {role!r}: one of {', '.join(ROLES)}")
        if len(password or "") < MIN_PASSWORD:
            raise BouncerError(f"password: at least {MIN_PASSWORD} characters")
        if self.role(name) is not None:
            raise BouncerError(f"user {name!r} exists (remove it first to change its role or password)")
        self.store.run("INSERT INTO users (name, role, pw_hash, created) VALUES (?, ?, ?, ?)",
                       (name, role, _hasher().hash(password), time.time()))  # fmt: skip

    def remove(self, name: str) -> None:
        if self.role(name) is None:
            raise BouncerError(f"no user {name!r}")
        for table in ("users", "api_tokens", "sessions"):
            self.store.run(f"DELETE FROM {table} WHERE name = ?", (name,))

    def list(self) -> list[dict[str, object]]:
        rows = self.store.rows("SELECT name, role, created FROM users ORDER BY name")
        tokens = dict(self.store.rows("SELECT name, COUNT(*) FROM api_tokens GROUP BY name"))
        return [{"name": n, "role": r, "created": c, "api_tokens": int(tokens.get(n, 0))} for n, r, c in rows]

    def role(self, name: str) -> str | None:
        rows = self.store.rows("SELECT role FROM users WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def check_password(self, name: str, password: str) -> Identity | None:
        rows = self.store.rows("SELECT role, pw_hash FROM users WHERE name = ?", (name,))
        hasher = _hasher()
        if not rows:
            hasher.hash(password or "-")  # the same work whether or not the name exists
            return None
        role, pw_hash = rows[0]
        try:
            hasher.verify(pw_hash, password or "")
        except Exception:  # argon2's VerifyMismatchError, InvalidHash ...
            return None
        return Identity(name, role, "password")

    # ---- API tokens -------------------------------------------------------------------------------

    def new_token(self, name: str) -> str:
        if self.role(name) is None:
            raise BouncerError(f"no user {name!r}")
        token = "bnc_" + secrets.token_urlsafe(32)
        self.store.run(
            "INSERT INTO api_tokens (hash, name, created) VALUES (?, ?, ?)", (_sha(token), name, time.time())
        )
        return token

    def by_token(self, token: str) -> Identity | None:
        rows = self.store.rows(
            "SELECT u.name, u.role FROM api_tokens t JOIN users u ON u.name = t.name WHERE t.hash = ?", (_sha(token),)
        )
        return Identity(rows[0][0], rows[0][1], "token") if rows else None

    # ---- browser sessions -------------------------------------------------------------------------

    def new_session(self, who: Identity) -> tuple[str, str]:
        """(session id for the cookie, CSRF token the pages echo)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        now = time.time()
        self.store.run("DELETE FROM sessions WHERE expires < ?", (now,))
        self.store.run("INSERT INTO sessions (hash, name, csrf, expires) VALUES (?, ?, ?, ?)",
                       (_sha(sid), who.name, csrf, now + SESSION_S))  # fmt: skip
        return sid, csrf

    def by_session(self, sid: str) -> Identity | None:
        rows = self.store.rows(
            "SELECT u.name, u.role, s.csrf FROM sessions s JOIN users u ON u.name = s.name "
            "WHERE s.hash = ? AND s.expires > ?",
            (_sha(sid), time.time()),
        )
        return Identity(rows[0][0], rows[0][1], "session", rows[0][2]) if rows else None

    def end_session(self, sid: str) -> None:
        self.store.run("DELETE FROM sessions WHERE hash = ?", (_sha(sid),))


class LoginThrottle:
    """Failed logins per user name and per client: after FREE_TRIES failures each further try must wait twice as
    long as the last (up to MAX_WAIT_S) since the latest failure; a success clears the user and the client. Kept
    in memory per web worker, at most MAX_KEYS keys (the oldest go first), so a flood costs bounded memory."""

    FREE_TRIES = 5
    MAX_WAIT_S = 900.0
    MAX_KEYS = 10_000

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures, time of the latest)
        self._lock = threading.Lock()

    def wait_s(self, *keys: str) -> float:
        """Seconds before any of `keys` may try again (0: now)."""
        now, wait = self.clock(), 0.0
        with self._lock:
            for key in keys:
                n, last = self._failures.get(key, (0, 0.0))
                if n >= self.FREE_TRIES:
                    wait = max(wait, last + min(2.0 ** (n - self.FREE_TRIES), self.MAX_WAIT_S) - now)
        return max(wait, 0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                n, _ = self._failures.pop(key, (0, 0.0))
                self._failures[key] = (n + 1, now)  # re-inserted: the dict's order is the latest failure's
            while len(self._failures) > self.MAX_KEYS:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())
