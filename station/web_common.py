"""What the station's web routes share: the context they are built with, the role each route needs (a FastAPI
dependency on the person the auth middleware identified), and the request helpers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from bouncer.station.accounts import Identity
from bouncer.station.service import Station

log = logging.getLogger("bouncer.station.web")
LOCAL_PATH = re.compile(r"/(?![/\\])[^\\\s]*")  # a path on this station: not //host, no backslash (/\host)


@dataclass
class WebContext:
    station: Station
    templates: Jinja2Templates

    def page(self, request: Request, name: str, **ctx: Any) -> HTMLResponse:
        """ctx holds `group` (the group the page shows) and the page's data."""
        who: Identity = request.state.who
        return self.templates.TemplateResponse(request, name, {"groups": self.station.groups, "who": who,
                                                               "csrf": who.csrf or "", "nonce": request.state.nonce,
                                                               **ctx})  # fmt: skip

    def classes(self, group: str) -> list[str]:
        return self.station.champion(group).classes


def _role(role: str | None):
    def who(request: Request) -> Identity:
        """The request's person (the middleware has identified them), if their role allows `role`'s work."""
        person: Identity = request.state.who
        if role is not None and not person.may(role):
            log.warning("%s %s refused: %s is %s, this needs %s", request.method, request.url.path, person.name,
                        person.role, role)  # fmt: skip
            raise HTTPException(403, f"{person.name} is {person.role}: this needs the {role} role")
        return person

    return Depends(who)


# a route names the role it needs as a parameter default: `def route(..., who: Identity = OPERATOR)`
ANYONE, OPERATOR, APPROVER, ADMIN = _role(None), _role("operator"), _role("approver"), _role("admin")


def csp(nonce: str, path: str) -> str:
    """Scripts only from here and the page's own inline scripts (by nonce); /api/docs loads Swagger UI."""
    scripts = f"'self' 'nonce-{nonce}'"
    if path.startswith("/api/docs"):
        scripts = "'self' 'unsafe-inline' https://cdn.jsdelivr.net"
    return (f"default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: blob: https://fastapi.tiangolo.com; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")  # fmt: skip


def local_path(next_path: str) -> str:
    """Where to go after logging in: a path on this station only (an open redirect otherwise)."""
    return next_path if LOCAL_PATH.fullmatch(next_path or "") else "/queue"


async def json_body(request: Request, example: str) -> dict[str, Any]:
    """The request's JSON object, or a 400 naming what was expected."""
    try:
        body = await request.json()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise HTTPException(400, f"expected a JSON body like {example}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, f"expected a JSON object like {example}")
    return body


def same_origin(request: Request) -> bool:
    """A browser names the page that sent a request in Origin; it must be this station (none: not a browser)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def iso_time(ts: Any) -> str:
    """Unix seconds -> ISO 8601 UTC (what a page shows before its script turns it into the reader's local time)."""
    try:
        return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"
