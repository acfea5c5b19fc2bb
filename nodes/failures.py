"""Kernel failures the dispatcher remembers, for the status route, and the route that
clears them (issue 13, defect 8).

A kernel that raises on a call shape is kept off that shape for the rest of the run and
tried again at the next run; after RETRY_LIMIT failures it stays off until cleared here
(or until ComfyUI restarts). Status shows every remembered failure so a user can see why
a backend stopped being used.
"""

from __future__ import annotations

from typing import Any

from ..attention.dispatch import RETRY_LIMIT, failure_rows, forget_failures

CLEAR_ROUTE = "/attention_backends/failures/clear"


def failures_status() -> dict[str, Any]:
    """Every remembered failure: the backend, the call shape, why, how often, and whether
    it is retried at the next run."""
    return {"retry_limit": RETRY_LIMIT, "clear_route": CLEAR_ROUTE, "failures": failure_rows()}


def register(server: Any) -> None:
    """POST /attention_backends/failures/clear: forget every remembered failure."""
    from aiohttp import web

    @server.routes.post(CLEAR_ROUTE)
    async def clear_failures(request: web.Request) -> web.Response:
        return web.json_response({"cleared": forget_failures()})

    # Without it a GET falls through to ComfyUI's static files and reads as "no such route".
    @server.routes.get(CLEAR_ROUTE)
    async def clear_failures_needs_post(request: web.Request) -> web.Response:
        return web.json_response({"error": f"{CLEAR_ROUTE} clears the remembered kernel failures on POST; "
                                           "GET /attention_backends/status lists them (kernel_failures)"},
                                 status=405, headers={"Allow": "POST"})
