"""The review queue: flagged frames and their incidents, images and heatmaps, labels (operators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from bouncer.runtime import schemas
from bouncer.runtime.gates.detector import DetectorTask
from bouncer.station.accounts import Identity
from bouncer.station.store import QueueFilter
from bouncer.station.web_common import OPERATOR, WebContext, json_body, log


def routes(ctx: WebContext) -> APIRouter:
    r = APIRouter()
    station = ctx.station

    @r.get("/api/queue")
    def api_queue(limit: int = 50, group: str | None = None) -> dict[str, Any]:
        group = station.check_group(group)
        limit = max(1, min(limit, 500))
        return {
            "group": group,
            "counts": station.store.counts(group),
            "classes": ctx.classes(group),
            "frames": [f.to_dict() for f in station.store.queue(limit, group)],
        }

    @r.get("/api/incidents")
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
            "classes": ctx.classes(group),
            "incidents": station.incidents(group, max(1, min(limit, 500)), filters=filters),
        }

    @r.post("/api/incidents/label")
    async def api_label_incident(request: Request, who: Identity = OPERATOR) -> dict[str, Any]:
        body = await json_body(request, '{"frames": [...], "label": "gear"}')
        ids = body.get("frames")
        if not isinstance(ids, list) or not ids or len(ids) > 5000 or not all(isinstance(i, str) for i in ids):
            raise HTTPException(422, "frames: a list of 1 to 5000 frame ids (an incident's frame_ids)")
        try:
            done = station.label_frames(ids, body.get("label"), who.name, body.get("boxes"))
        except KeyError as exc:
            raise HTTPException(404, f"no frame {exc.args[0]}") from None
        except schemas.SchemaError as exc:
            raise HTTPException(422, str(exc)) from None
        return {**done, "counts": station.store.counts()}

    @r.get("/queue", response_class=HTMLResponse)
    def queue(
        request: Request, group: str | None = None, view: str = "incidents", device: str | None = None,
        reason: str | None = None, decision: str | None = None,
    ) -> HTMLResponse:  # fmt: skip
        group = station.check_group(group)
        detector = isinstance(station.champion(group).task, DetectorTask)
        return ctx.page(request, "queue.html", group=group, classes=ctx.classes(group),
                        counts=station.store.counts(group), detector=detector,
                        view="frames" if view == "frames" else "incidents",
                        filters={"device": device, "reason": reason, "decision": decision})  # fmt: skip

    @r.get("/api/frames/{frame_id}")
    def api_frame(frame_id: str) -> dict[str, Any]:
        f = station.store.frame(frame_id)
        if f is None:
            raise HTTPException(404, f"no frame {frame_id}")
        return f.to_dict()

    @r.get("/api/frames/{frame_id}/image.jpg")
    def api_image(frame_id: str) -> Response:
        data = station.store.image(frame_id)
        if data is None:
            raise HTTPException(404, f"no image for frame {frame_id}")
        return Response(data, media_type="image/jpeg")

    @r.get("/api/frames/{frame_id}/heatmap.png")
    def api_heatmap(frame_id: str) -> Response:
        data = station.store.image(frame_id, heatmap=True)
        if data is None:
            raise HTTPException(404, f"no heatmap for frame {frame_id}")
        return Response(data, media_type="image/png")

    @r.post("/api/frames/{frame_id}/label")
    async def api_label(frame_id: str, request: Request, who: Identity = OPERATOR) -> dict[str, Any]:
        body = await json_body(request, '{"label": "gear"} (or {"boxes": [...]})')
        try:
            done = station.label(frame_id, body.get("label"), who.name, body.get("boxes"))
        except KeyError:
            log.warning("label for unknown frame %s refused", frame_id)
            raise HTTPException(404, f"no frame {frame_id}") from None
        except schemas.SchemaError as exc:
            log.warning("label for frame %s refused: %s", frame_id, exc)
            raise HTTPException(422, str(exc)) from None
        return {**done, "counts": station.store.counts()}

    return r
