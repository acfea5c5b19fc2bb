"""HTTP routes (docs/api.md): what this machine can run, the last run reports, and the
charts of the committed benchmark runs."""

from __future__ import annotations

import asyncio
from typing import Any

from ..attention import names, sparse_names
from ..attention.contract import decision_json
from ..attention.priority_list import STRATEGY_NAMES
from ..attention.status import machine_status
from . import failures
from .benchmarks import CHART_ROUTE, chart_path, list_benchmarks, shown_name
from .failures import failures_status
from .raw_inputs import mark_non_boolean_inputs
from .report import last_reports
from .tuning import auto_measured_status, register_user_folder, tuning_status


def selectable() -> list[str]:
    """What the Attention Backend node's combo offers: always the full list of dense
    backends (the sparse ones are the Sparse node's, with its quality checks), after the
    strategies (`auto`, `auto_tuned`)."""
    sparse = set(sparse_names())
    return list(STRATEGY_NAMES) + [name for name in names() if name not in sparse]


def structured_tuning(tuning: dict) -> dict:
    """The status route's `tuning` with each decision's signature as fields and its
    candidates' verdicts as {kind, text} (attention.contract)."""
    return {**tuning, "devices": [{**device, "decisions": [decision_json(d) for d in device["decisions"]]}
                                  for device in tuning["devices"]]}


def status() -> dict:
    return {**machine_status(), "nodes": {"selectable": selectable(), "sparse": sparse_names()},
            "benchmarks": list_benchmarks(), "tuning": structured_tuning(tuning_status()),
            "auto_measured": structured_tuning(auto_measured_status()),
            "kernel_failures": failures_status()}


def register(server: Any) -> None:
    """Add the routes to ComfyUI's route table (mirrored under /api by ComfyUI)."""
    from aiohttp import web

    register_user_folder()
    failures.register(server)
    # Not a route: posted boolean inputs are checked before ComfyUI converts them (raw_inputs.py).
    server.add_on_prompt_handler(mark_non_boolean_inputs)

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
            return web.json_response({"error": f"no report for node {shown_name(node)} yet"}, status=404)
        return web.json_response(reports[node])

    def no_chart(message: str, code: int) -> web.Response:
        # ComfyUI's cache middleware gives an error at a .png path an hour of caching; a
        # refusal must not outlive the reason for it.
        return web.json_response({"error": message}, status=code, headers={"Cache-Control": "no-store"})

    @server.routes.get(CHART_ROUTE)
    async def get_benchmark_chart(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            path = chart_path(name)
        except ValueError as error:
            return no_chart(str(error), 400)
        if path is None:
            published = [run["name"] for run in list_benchmarks() if run["chart"]]
            return no_chart(f"no benchmark chart named {shown_name(name)}; published: "
                            f"{', '.join(published) or 'none'} "
                            "(GET /attention_backends/status lists them under 'benchmarks')", 404)
        # Revalidated on every load (answered 304 through the ETag/Last-Modified that
        # FileResponse sets): the chart changes with the pack, and ComfyUI's cache
        # middleware would otherwise keep a .png for a day.
        return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "no-cache"})
