"""The station's web UI and JSON API (FastAPI, server-rendered Jinja2 templates, a little vanilla JS).

Every page has a JSON twin under /api. Access needs a person (a browser session from /login, with its CSRF token on
every change, or the person's API token: Authorization: Bearer) or the station's shared token (scripts); on
loopback, with no token configured and no accounts, anyone (the demo). Roles (station/accounts.py): operators
label, approvers also retrain and approve, admins also manage accounts. /tuf is public: TUF metadata and targets
are signed, not secret.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.detector import DetectorTask
from bouncer.station.accounts import SESSION_S, Identity, LoginThrottle, same
from bouncer.station.config import LOOPBACK
from bouncer.station.service import GroupError, Station
from bouncer.station.store import QueueFilter

HERE = Path(__file__).parent
log = logging.getLogger("bouncer.station.web")
PUBLIC = ("/tuf/", "/static/", "/healthz", "/login", "/api/login")
SHARED = Identity("station-token", "admin", "token")  # the station's one token ($BOUNCER_STATION_TOKEN): scripts
OPEN = Identity("local", "admin", "open")
LOCAL_PATH = re.compile(r"/(?![/\\])[^\\\s]*")  # a path on this station: not //host, no backslash (/\host)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_BODY_BYTES = 4 * 1024 * 1024  # the largest change: 5,000 frame ids, or 500 boxes, with room to spare
ARGON2_AT_ONCE = 2  # password checks in flight: a login flood must not take the workers the API and OTA need


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


def resolve_token(station: Station) -> str | None:
    token = os.environ.get(station.cfg.http.token_env) or None
    if token is None and station.cfg.http.host not in LOOPBACK:
        raise BouncerError(
            f"http.host {station.cfg.http.host!r} is not loopback: set a token in ${station.cfg.http.token_env}"
        )
    return token


def iso_time(ts: Any) -> str:
    """Unix seconds -> ISO 8601 UTC (what a page shows before its script turns it into the reader's local time)."""
    try:
        return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def create_app(station: Station, token: str | None) -> FastAPI:
    app = FastAPI(title="Bouncer review station", docs_url="/api/docs", openapi_url="/api/openapi.json")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["iso"] = iso_time
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/tuf/{path:path}", include_in_schema=False)
    def tuf_file(path: str) -> Response:
        """The TUF repository, from where the station keeps objects (data_dir, or the object store that the
        retrain role copies it to): any web worker serves it, and its signatures make it trustworthy."""
        try:
            data = station.store.objects.get(f"tuf/{path}")
        except ValueError:  # a key leaving the store
            data = None
        except OSError as exc:
            raise HTTPException(503, f"the TUF repository is unavailable now: {exc}") from None
        if data is None:
            raise HTTPException(404, f"no TUF file {path!r}")
        media = "application/json" if path.endswith(".json") else "application/octet-stream"
        return Response(data, media_type=media)

    accounts = station.accounts

    throttle = LoginThrottle()
    argon2_slots = anyio.CapacityLimiter(ARGON2_AT_ONCE)

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

    def need(request: Request, role: str) -> Identity:
        """The request's person, if their role allows `role`'s work (403 otherwise)."""
        who: Identity = request.state.who
        if not who.may(role):
            log.warning("%s %s refused: %s is %s, this needs %s", request.method, request.url.path, who.name,
                        who.role, role)  # fmt: skip
            raise HTTPException(403, f"{who.name} is {who.role}: this needs the {role} role")
        return who

    # ---- people ---------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/queue") -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"groups": station.groups, "group": None,
                                                                  "next": local_path(next), "csrf": "",
                                                                  "nonce": request.state.nonce})  # fmt: skip

    @app.post("/api/login")
    async def api_login(request: Request) -> JSONResponse:
        body = await json_body(request, '{"name": ..., "password": ...}')
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or len(name) > 64 or len(password) > 1024:
            raise HTTPException(400, 'expected {"name": ..., "password": ...} (a name of at most 64 characters)')
        client = f"client:{request.client.host if request.client else '-'}"
        keys = (f"user:{name}", client)
        if (wait := throttle.wait_s(*keys)) > 0:
            log.warning("login for %r from %s throttled: %.0f s to wait", name, client, wait)
            raise HTTPException(429, f"too many failed logins: try again in {wait:.0f} s",
                                headers={"Retry-After": str(max(1, round(wait)))})  # fmt: skip
        # argon2 is slow on purpose: in a worker thread, a few at a time, so the event loop keeps serving
        who = await anyio.to_thread.run_sync(accounts.check_password, name, password, limiter=argon2_slots)
        if who is None:
            throttle.failed(*keys)
            log.warning("login refused for %r from %s", name, client)
            raise HTTPException(401, "wrong name or password")
        throttle.succeeded(*keys)
        sid, csrf = accounts.new_session(who)
        response = JSONResponse({"name": who.name, "role": who.role, "csrf": csrf})
        response.set_cookie("bouncer_session", sid, httponly=True, samesite="strict", max_age=SESSION_S)
        return response

    @app.post("/api/logout")
    def api_logout(request: Request) -> JSONResponse:
        sid = request.cookies.get("bouncer_session")
        if sid:
            accounts.end_session(sid)
        response = JSONResponse({"ok": True})
        response.delete_cookie("bouncer_session")
        return response

    @app.get("/api/me")
    def api_me(request: Request) -> dict[str, Any]:
        who: Identity = request.state.who
        return {"name": who.name, "role": who.role, "via": who.via}

    @app.get("/api/users")
    def api_users(request: Request) -> list[dict[str, Any]]:
        need(request, "admin")
        return accounts.list()

    @app.post("/api/users")
    async def api_add_user(request: Request) -> dict[str, Any]:
        who = need(request, "admin")
        body = await json_body(request, '{"name": ..., "role": ..., "password": ...}')
        try:
            accounts.add(str(body.get("name") or ""), str(body.get("role") or ""), str(body.get("password") or ""))
        except BouncerError as exc:
            raise HTTPException(422, str(exc)) from None
        log.info("user %s added by %s", body.get("name"), who.name)
        return {"name": body["name"], "role": body["role"]}

    @app.delete("/api/users/{name}")
    def api_remove_user(name: str, request: Request) -> dict[str, Any]:
        who = need(request, "admin")
        try:
            accounts.remove(name)
        except BouncerError as exc:
            raise HTTPException(404, str(exc)) from None
        log.info("user %s removed by %s", name, who.name)
        return {"removed": name}

    @app.exception_handler(GroupError)
    async def unknown_group(request: Request, exc: GroupError) -> JSONResponse:
        log.warning("%s %s refused: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=404)

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        """ctx holds `group` (the group the page shows) and the page's data."""
        who: Identity = request.state.who
        return templates.TemplateResponse(request, name, {"groups": station.groups, "who": who, "csrf": who.csrf or "",
                                                          "nonce": request.state.nonce, **ctx})  # fmt: skip

    # ---- review queue ---------------------------------------------------------------------------

    def classes(group: str) -> list[str]:
        return station.champion(group).classes

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

    @app.get("/api/queue")
    def api_queue(limit: int = 50, group: str | None = None) -> dict[str, Any]:
        group = station.check_group(group)
        limit = max(1, min(limit, 500))
        return {
            "group": group,
            "counts": station.store.counts(group),
            "classes": classes(group),
            "frames": [f.to_dict() for f in station.store.queue(limit, group)],
        }

    @app.get("/api/incidents")
    def api_incidents(
        limit: int = 50, group: str | None = None, device: str | None = None, reason: str | None = None,
        decision: str | None = None, since: float | None = None, until: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Filters: one device, one reason, one decision, a window of device time (Unix seconds)."""
        group = station.check_group(group)
        if decision not in (None, "", "review", "reject", "accept"):
            raise HTTPException(422, "decision: review, reject or accept")
        filters = QueueFilter(device or None, reason or None, decision or None, since, until)
        return {
            "group": group,
            "counts": station.store.counts(group),
            "classes": classes(group),
            "incidents": station.incidents(group, max(1, min(limit, 500)), filters=filters),
        }

    @app.post("/api/incidents/label")
    async def api_label_incident(request: Request) -> dict[str, Any]:
        body = await json_body(request, '{"frames": [...], "label": "gear"}')
        ids = body.get("frames")
        if not isinstance(ids, list) or not ids or len(ids) > 5000 or not all(isinstance(i, str) for i in ids):
            raise HTTPException(422, "frames: a list of 1 to 5000 frame ids (an incident's frame_ids)")
        try:
            done = station.label_frames(ids, body.get("label"), need(request, "operator").name, body.get("boxes"))
        except KeyError as exc:
            raise HTTPException(404, f"no frame {exc.args[0]}") from None
        except schemas.SchemaError as exc:
            raise HTTPException(422, str(exc)) from None
        return {**done, "counts": station.store.counts()}

    @app.get("/queue", response_class=HTMLResponse)
    def queue(
        request: Request, group: str | None = None, view: str = "incidents", device: str | None = None,
        reason: str | None = None, decision: str | None = None,
    ) -> HTMLResponse:  # fmt: skip
        group = station.check_group(group)
        detector = isinstance(station.champion(group).task, DetectorTask)
        return page(request, "queue.html", group=group, classes=classes(group), counts=station.store.counts(group),
                    detector=detector, view="frames" if view == "frames" else "incidents",
                    filters={"device": device, "reason": reason, "decision": decision})  # fmt: skip

    @app.get("/api/frames/{frame_id}")
    def api_frame(frame_id: str) -> dict[str, Any]:
        f = station.store.frame(frame_id)
        if f is None:
            raise HTTPException(404, f"no frame {frame_id}")
        return f.to_dict()

    @app.get("/api/frames/{frame_id}/image.jpg")
    def api_image(frame_id: str) -> Response:
        data = station.store.image(frame_id)
        if data is None:
            raise HTTPException(404, f"no image for frame {frame_id}")
        return Response(data, media_type="image/jpeg")

    @app.get("/api/frames/{frame_id}/heatmap.png")
    def api_heatmap(frame_id: str) -> Response:
        data = station.store.image(frame_id, heatmap=True)
        if data is None:
            raise HTTPException(404, f"no heatmap for frame {frame_id}")
        return Response(data, media_type="image/png")

    @app.post("/api/frames/{frame_id}/label")
    async def api_label(frame_id: str, request: Request) -> dict[str, Any]:
        body = await json_body(request, '{"label": "gear"} (or {"boxes": [...]})')
        try:
            done = station.label(frame_id, body.get("label"), need(request, "operator").name, body.get("boxes"))
        except KeyError:
            log.warning("label for unknown frame %s refused", frame_id)
            raise HTTPException(404, f"no frame {frame_id}") from None
        except schemas.SchemaError as exc:
            log.warning("label for frame %s refused: %s", frame_id, exc)
            raise HTTPException(422, str(exc)) from None
        return {**done, "counts": station.store.counts()}

    # ---- fleet ----------------------------------------------------------------------------------

    def fleet() -> dict[str, Any]:
        return {
            "devices": station.store.devices(),
            "drift_events": station.store.events("drift", 50),
            "gate_events": station.store.events("gate_", 50),
            "quarantined": station.store.quarantined(20),
        }

    @app.get("/api/fleet")
    def api_fleet() -> dict[str, Any]:
        return fleet()

    @app.get("/api/events")
    def api_events(kind: str = "", limit: int = 100) -> list[dict[str, Any]]:
        return station.store.events(kind, max(1, min(limit, 1000)))

    @app.get("/api/series")
    def api_series(group: str | None = None, minutes: float = 60.0) -> dict[str, Any]:
        from bouncer.station.series import group_series

        return group_series(station.store, station.check_group(group), max(1.0, min(minutes, 7 * 24 * 60)))

    @app.get("/fleet", response_class=HTMLResponse)
    def fleet_page(request: Request, group: str | None = None) -> HTMLResponse:
        return page(request, "fleet.html", group=station.check_group(group), **fleet())

    # ---- gates ----------------------------------------------------------------------------------

    def gates(group: str) -> dict[str, Any]:
        versions = {g["version"] for g in station.store.gates(group)}
        return {
            "group": group,
            "gates": station.store.gates(group),
            "published": station.repo.current(group),
            "last_retrain": station.store.last_retrain(group),
            "audit": [a for a in station.store.audit_log() if a["gate_version"] in versions][-50:],
        }

    @app.get("/api/gates")
    def api_gates(group: str | None = None) -> dict[str, Any]:
        return gates(station.check_group(group))

    @app.get("/gates", response_class=HTMLResponse)
    def gates_page(request: Request, group: str | None = None) -> HTMLResponse:
        group = station.check_group(group)
        return page(request, "gates.html", **gates(group))

    @app.get("/api/gates/{version}/card.md")
    def api_gate_card(version: str) -> Response:
        try:
            text = station.card(version)
        except KeyError:
            raise HTTPException(404, f"no gate {version}") from None
        except OSError as exc:
            raise HTTPException(503, f"the gate card is unavailable now: {exc}") from None
        if text is None:
            raise HTTPException(404, f"no card for gate {version}")
        return Response(text, media_type="text/markdown; charset=utf-8")

    @app.post("/api/gates/{version}/approve")
    def api_approve(version: str, request: Request) -> dict[str, Any]:
        user = need(request, "approver").name
        try:
            return station.approve(version, user)
        except KeyError:
            log.warning("approval of unknown gate %s refused", version)
            raise HTTPException(404, f"no gate {version}") from None
        except BouncerError as exc:
            log.warning("approval by %s refused: %s", user, exc)
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/audit")
    def api_audit(format: str = "json", gate: str | None = None) -> Response:
        rows = station.store.audit_log(gate)
        if format == "csv":
            import csv
            import io
            import json as _json

            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["id", "ts", "gate_version", "event", "actor", "device", "details"])
            for r in rows:
                w.writerow([r["id"], r["ts"], r["gate_version"], r["event"], r["actor"], r["device"] or "",
                            _json.dumps(r["details"])])  # fmt: skip
            return Response(buf.getvalue(), media_type="text/csv",
                            headers={"Content-Disposition": "attachment; filename=bouncer-audit.csv"})  # fmt: skip
        if format != "json":
            raise HTTPException(422, "format: json or csv")
        return JSONResponse(rows)

    @app.post("/api/retrain")
    def api_retrain(request: Request, group: str | None = None) -> dict[str, Any]:
        need(request, "approver")
        group = station.check_group(group)
        try:
            result = station.retrain(group)
        except GroupError:
            raise
        except BouncerError as exc:
            raise HTTPException(409, str(exc)) from None
        pending = result.publish and station.cfg.retrain.approval == "manual"
        return {
            "group": group,
            "pending_approval": pending,
            "published": result.publish and not pending,
            "reason": result.reason,
            "version": result.challenger.version if result.challenger else None,
            "metrics": result.metrics,
        }

    return app
