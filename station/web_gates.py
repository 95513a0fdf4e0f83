"""Gates: the TUF repository devices update from (public: signed, not secret), the gates and their cards, approval
and retraining (approvers), the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bouncer.runtime.errors import BouncerError
from bouncer.station.accounts import Identity
from bouncer.station.service import GroupError
from bouncer.station.web_common import APPROVER, WebContext, log


def routes(ctx: WebContext) -> APIRouter:
    r = APIRouter()
    station = ctx.station

    @r.get("/tuf/{path:path}", include_in_schema=False)
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

    def gates(group: str) -> dict[str, Any]:
        versions = {g["version"] for g in station.store.gates(group)}
        return {
            "group": group,
            "gates": station.store.gates(group),
            "published": station.repo.current(group),
            "last_retrain": station.store.last_retrain(group),
            "audit": [a for a in station.store.audit_log() if a["gate_version"] in versions][-50:],
        }

    @r.get("/api/gates")
    def api_gates(group: str | None = None) -> dict[str, Any]:
        return gates(station.check_group(group))

    @r.get("/gates", response_class=HTMLResponse)
    def gates_page(request: Request, group: str | None = None) -> HTMLResponse:
        group = station.check_group(group)
        return ctx.page(request, "gates.html", **gates(group))

    @r.get("/api/gates/{version}/card.md")
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

    @r.post("/api/gates/{version}/approve")
    def api_approve(version: str, who: Identity = APPROVER) -> dict[str, Any]:
        user = who.name
        try:
            return station.approve(version, user)
        except KeyError:
            log.warning("approval of unknown gate %s refused", version)
            raise HTTPException(404, f"no gate {version}") from None
        except BouncerError as exc:
            log.warning("approval by %s refused: %s", user, exc)
            raise HTTPException(409, str(exc)) from None

    @r.get("/api/audit")
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

    @r.post("/api/retrain")
    def api_retrain(group: str | None = None, who: Identity = APPROVER) -> dict[str, Any]:
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

    return r
