"""HTTP routes (docs/api.md): what this machine can run, and the last run reports."""

from __future__ import annotations

import asyncio
from typing import Any

from ..attention import AUTO, names
from ..attention.status import machine_status
from .report import last_reports


def selectable() -> list[str]:
    """What the Attention Backend node's combo offers: always the full list."""
    return [AUTO] + names()


def status() -> dict:
    return {**machine_status(), "nodes": {"selectable": selectable()}}


def register(server: Any) -> None:
    """Add the routes to ComfyUI's route table (mirrored under /api by ComfyUI)."""
    from aiohttp import web

    @server.routes.get("/attention_backends/status")
    async def get_status(request: web.Request) -> web.Response:
        # Availability probes import packages and may run tiny kernels: off the event loop.
        return web.json_response(await asyncio.to_thread(status))

    @server.routes.get("/attention_backends/report")
    async def get_report(request: web.Request) -> web.Response:
        reports = last_reports()
        node = request.query.get("node")
        if node is None:
            return web.json_response({"reports": reports})
        if node not in reports:
            return web.json_response({"error": f"no report for node {node} yet"}, status=404)
        return web.json_response(reports[node])
