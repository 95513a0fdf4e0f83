"""People: the login page, sessions, the person's own record, accounts (admins)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from bouncer.runtime.errors import BouncerError
from bouncer.station.accounts import SESSION_S, Identity, LoginThrottle
from bouncer.station.web_common import ADMIN, ANYONE, WebContext, json_body, local_path, log

ARGON2_AT_ONCE = 2  # password checks in flight: a login flood must not take the workers the API and OTA need


def routes(ctx: WebContext) -> APIRouter:
    r = APIRouter()
    station = ctx.station
    accounts = station.accounts
    templates = ctx.templates
    throttle = LoginThrottle()
    argon2_slots = anyio.CapacityLimiter(ARGON2_AT_ONCE)

    @r.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/queue") -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"groups": station.groups, "group": None,
                                                                  "next": local_path(next), "csrf": "",
                                                                  "nonce": request.state.nonce})  # fmt: skip

    @r.post("/api/login")
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

    @r.post("/api/logout")
    def api_logout(request: Request) -> JSONResponse:
        sid = request.cookies.get("bouncer_session")
        if sid:
            accounts.end_session(sid)
        response = JSONResponse({"ok": True})
        response.delete_cookie("bouncer_session")
        return response

    @r.get("/api/me")
    def api_me(who: Identity = ANYONE) -> dict[str, Any]:
        return {"name": who.name, "role": who.role, "via": who.via}

    @r.get("/api/users")
    def api_users(who: Identity = ADMIN) -> list[dict[str, Any]]:
        return accounts.list()

    @r.post("/api/users")
    async def api_add_user(request: Request, who: Identity = ADMIN) -> dict[str, Any]:
        body = await json_body(request, '{"name": ..., "role": ..., "password": ...}')
        try:
            accounts.add(str(body.get("name") or ""), str(body.get("role") or ""), str(body.get("password") or ""))
        except BouncerError as exc:
            raise HTTPException(422, str(exc)) from None
        log.info("user %s added by %s", body.get("name"), who.name)
        return {"name": body["name"], "role": body["role"]}

    @r.delete("/api/users/{name}")
    def api_remove_user(name: str, who: Identity = ADMIN) -> dict[str, Any]:
        try:
            accounts.remove(name)
        except BouncerError as exc:
            raise HTTPException(404, str(exc)) from None
        log.info("user %s removed by %s", name, who.name)
        return {"removed": name}

    return r
