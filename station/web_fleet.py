"""The fleet: devices, their events and the group's time series."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from bouncer.station.web_common import WebContext


def routes(ctx: WebContext) -> APIRouter:
    r = APIRouter()
    station = ctx.station

    def fleet() -> dict[str, Any]:
        return {
            "devices": station.store.devices(),
            "drift_events": station.store.events("drift", 50),
            "gate_events": station.store.events("gate_", 50),
            "quarantined": station.store.quarantined(20),
        }

    @r.get("/api/fleet")
    def api_fleet() -> dict[str, Any]:
        return fleet()

    @r.get("/api/events")
    def api_events(kind: str = "", limit: int = 100) -> list[dict[str, Any]]:
        return station.store.events(kind, max(1, min(limit, 1000)))

    @r.get("/api/series")
    def api_series(group: str | None = None, minutes: float = 60.0) -> dict[str, Any]:
        from bouncer.station.series import group_series

        return group_series(station.store, station.check_group(group), max(1.0, min(minutes, 7 * 24 * 60)))

    @r.get("/fleet", response_class=HTMLResponse)
    def fleet_page(request: Request, group: str | None = None) -> HTMLResponse:
        return ctx.page(request, "fleet.html", group=station.check_group(group), **fleet())

    return r
