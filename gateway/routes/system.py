"""Operational routes: liveness, readiness, metrics, the API document, problem types."""

from __future__ import annotations

import asyncio
import os
from typing import Final

from aiohttp import web

from engine import EngineError
from gateway import metrics, openapi
from gateway.commands import ENGINE
from gateway.problems import PROBLEM_TYPES, ProblemError
from gateway.schemas import encode

READY_TIMEOUT_S: Final = 2.0
routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "pid": os.getpid()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[ENGINE].ping(), READY_TIMEOUT_S)
    except (EngineError, TimeoutError) as error:
        raise ProblemError("unavailable", detail=f"database not ready: {error}") from None
    return web.json_response({"status": "ready", "pid": os.getpid()})


@routes.get("/metrics")
async def metrics_text(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


_DOCUMENT: Final = encode(openapi.document())


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT, content_type="application/json")


@routes.get("/problems/{code}")
async def problem_type(request: web.Request) -> web.Response:
    found = PROBLEM_TYPES.get(request.match_info["code"])
    if found is None:
        raise ProblemError("not_found", detail="no such problem type")
    return web.Response(text=f"{found.code} (HTTP {found.status}): {found.title}\n")


ROUTES: Final = list(routes)
