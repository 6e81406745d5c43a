"""The swarm page: ``/`` (the page), ``/static/*`` (its script and style, shipped in the package: no CDN) and
``/api/swarm`` (the JSON behind it). Served by ``corolla api`` beside the OpenAI API, and alone by
``corolla health --port``."""
from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from corolla.api.swarm_view import SwarmView

STATIC = Path(__file__).parent / "static"


def page_routes(view: SwarmView) -> list:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def swarm(request: Request) -> Response:
        try:
            data = await asyncio.to_thread(view.snapshot)
        except Exception as exc:  # the DHT unreachable for now: say so, keep serving
            return JSONResponse({"error": {"message": f"the swarm could not be read: {type(exc).__name__}: {exc}",
                                           "type": "server_error", "param": None, "code": "swarm_unreadable"}},
                                status_code=503)
        return JSONResponse(data)

    return [Route("/", index, methods=["GET"]), Route("/api/swarm", swarm, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
