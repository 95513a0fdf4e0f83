"""The station's web UI and JSON API (FastAPI, server-rendered Jinja2 templates, a little vanilla JS).

Here: the app, its middleware (who is asking, which changes are refused before any work, the security headers),
health and metrics. The routes are grouped by concern in web_people, web_review, web_fleet and web_gates, each
naming the role it needs as a dependency (station/web_common.py). Every page has a JSON twin under /api. Access
needs a person (a browser session from /login, with its CSRF token on every change, or the person's API token:
Authorization: Bearer) or the station's shared token (scripts); on loopback, with no token configured and no
accounts, anyone (the demo). Roles (station/accounts.py): operators label, approvers also retrain and approve,
admins also manage accounts. /tuf is public: TUF metadata and targets are signed, not secret.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from bouncer.runtime.errors import BouncerError
from bouncer.station import web_fleet, web_gates, web_people, web_review
from bouncer.station.accounts import Identity, same
from bouncer.station.config import LOOPBACK
from bouncer.station.service import GroupError, Station
from bouncer.station.web_common import WebContext, csp, iso_time, log, same_origin

HERE = Path(__file__).parent
PUBLIC = ("/tuf/", "/static/", "/healthz", "/login", "/api/login")
SHARED = Identity("station-token", "admin", "token")  # the station's one token ($BOUNCER_STATION_TOKEN): scripts
OPEN = Identity("local", "admin", "open")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_BODY_BYTES = 4 * 1024 * 1024  # the largest change: 5,000 frame ids, or 500 boxes, with room to spare


def resolve_token(station: Station) -> str | None:
    token = os.environ.get(station.cfg.http.token_env) or None
    if token is None and station.cfg.http.host not in LOOPBACK:
        raise BouncerError(
            f"http.host {station.cfg.http.host!r} is not loopback: set a token in ${station.cfg.http.token_env}"
        )
    return token


def create_app(station: Station, token: str | None) -> FastAPI:
    app = FastAPI(title="Bouncer review station", docs_url="/api/docs", openapi_url="/api/openapi.json")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["iso"] = iso_time
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    accounts = station.accounts

    def identify(request: Request) -> Identity | None:
        """A bearer token (scripts, people's API tokens) or a browser session; no token in a URL or a cookie of
        its own (a link or a page elsewhere must not act for anyone)."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
            if token is not None and same(given, token):
                return SHARED
            return accounts.by_token(given)
        sid = request.cookies.get("bouncer_session")
        if sid and (who := accounts.by_session(sid)) is not None:
            return who
        if token is None and not accounts.any():
            return OPEN  # loopback, no token, no accounts: the demo and a single line on one machine
        return None

    def refuse_change(request: Request, who: Identity | None) -> tuple[int, str] | None:
        """Why a state change is refused before any work: a page elsewhere can send a form (text/plain, urlencoded)
        to this station, with its cookies, but not a JSON request without asking first (CORS, which is off)."""
        if request.method in SAFE_METHODS:
            return None
        length = request.headers.get("content-length")
        if length is None and request.headers.get("transfer-encoding"):
            return 411, "state changes give their Content-Length (no chunked bodies)"
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return 413, f"a body of at most {MAX_BODY_BYTES} bytes"
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and request.method != "DELETE":  # a form cannot send DELETE
            return 403, "state changes take Content-Type: application/json"
        if not same_origin(request):
            return 403, f"request from another origin ({request.headers.get('origin')!r})"
        if who is not None and who.via == "session" and not same(request.headers.get("x-csrf-token"), who.csrf):
            return 403, "missing or wrong CSRF token (header X-CSRF-Token)"
        return None

    @app.middleware("http")
    async def auth(request: Request, call_next):
        request.state.nonce = secrets.token_urlsafe(16)
        response = await guarded(request, call_next)
        response.headers["Content-Security-Policy"] = csp(request.state.nonce, request.url.path)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    async def guarded(request: Request, call_next):
        path = request.url.path
        if path.startswith(PUBLIC):
            if path.startswith("/api/login") and (refused := refuse_change(request, None)):
                log.warning("%s %s refused: %s", request.method, path, refused[1])
                return JSONResponse({"detail": refused[1]}, status_code=refused[0])
            return await call_next(request)
        who = identify(request)
        if who is None:
            if request.method == "GET" and not path.startswith("/api/"):
                return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
            return JSONResponse({"error": "log in (POST /api/login) or give a token (Authorization: Bearer TOKEN)"},
                                status_code=401)  # fmt: skip
        if refused := refuse_change(request, who):
            log.warning("%s %s refused for %s: %s", request.method, path, who.name, refused[1])
            return JSONResponse({"error": refused[1], "detail": refused[1]}, status_code=refused[0])
        request.state.who = who
        return await call_next(request)

    @app.exception_handler(GroupError)
    async def unknown_group(request: Request, exc: GroupError) -> JSONResponse:
        log.warning("%s %s refused: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """503 while ingest is down: its writer thread ended, or messages wait and nothing was stored lately."""
        ingest = station.ingest_health()
        ok = ingest is None or ingest["ok"]
        return JSONResponse({"ok": ok, "ingest": ingest}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text: ingest liveness and what it stored or set aside (this worker, since it started)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

        reg = CollectorRegistry()
        ingest = station.ingest_health() or {}
        Gauge("bouncer_station_ingest_healthy", "1 while MQTT ingest stores what arrives", registry=reg).set(
            1.0 if ingest.get("ok", True) else 0.0
        )
        counts = Gauge("bouncer_station_ingest_messages", "messages by outcome", ["outcome"], registry=reg)
        for outcome in ("frames", "duplicates", "conflicts", "events", "quarantined", "retries", "waiting"):
            counts.labels(outcome).set(float(ingest.get(outcome, 0)))
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/queue")

    ctx = WebContext(station, templates)
    for concern in (web_people, web_gates, web_review, web_fleet):  # the TUF repository first, as before
        app.include_router(concern.routes(ctx))
    return app
