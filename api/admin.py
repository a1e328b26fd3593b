"""`/admin/*`: operator endpoints behind the admin key."""

from __future__ import annotations

import time

import structlog
from flask import Blueprint, Response, jsonify

from api.auth import admin_required
from api.bundle import build_bundle
from api.metrics import exposition
from api.services import services
from shared.capacity import capacity_view

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = structlog.get_logger()


@bp.get("/debug-bundle")
@admin_required
def debug_bundle() -> Response:
    """A .tar.gz with settings (redacted), versions, queues, workers, failures, decisions, metrics."""
    svc = services()
    content = build_bundle(svc.settings, svc.redis, exposition())
    log.info("debug_bundle_built", bytes=len(content))
    name = time.strftime("gptoss-debug-%Y%m%dT%H%M%SZ.tar.gz", time.gmtime())
    return Response(
        content,
        mimetype="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@bp.get("/capacity")
@admin_required
def capacity() -> Response:
    """Workers' states and memory pressure, queues, held jobs and drain rate, as the scheduler sees them."""
    svc = services()
    return jsonify(capacity_view(svc.redis, svc.settings))
