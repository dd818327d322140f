"""The dashboard: server-rendered pages (Jinja2) over the same servicers as the JSON API.

Every page gets its data through `Gateway.call`, so keys, roles and tenants are checked exactly as
for gRPC; an error renders a small page with the error's HTTP status, and a missing or bad key
renders the login form (401). The browser logs in by pasting an API key, kept in the `runs_key`
cookie (HttpOnly, SameSite=Strict; Secure unless the HTTP address is loopback, so a dashboard
served off loopback must be reached over https, e.g. behind a TLS terminator). POST /login and
/logout are refused unless they come from this origin (gateway.same_origin): no login CSRF.
Live parts are HTML fragments under /ui/ that the page's script re-fetches (the runs table every
2 s, its counts by status then at most every COUNTS_SECONDS per caller; a run's DAG, timeline and
steps on each of its Server-Sent Events). Changes (cancel, rebuild) are the JSON API's POST
routes, called by the page's script with `X-Runs-Csrf: 1`.

Query strings are read as the JSON API reads them (`routes.from_query`: the runs page takes
/v1/runs' status, workflow, query, page_size and page_token), and the servicers validate them; the
event types the page's script listens for and which of them end a run come from shared.events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from services.run_api.auth import is_loopback
from services.run_api.errors import PermissionDenied, RunsError, Unauthenticated
from services.run_api.http import dag
from services.run_api.http.gateway import KEY_COOKIE, Gateway, http_status, same_origin
from services.run_api.http.routes import from_query
from services.run_api.interceptors import translate
from shared.events import TERMINAL_EVENTS, TERMINAL_STATUSES, EventType, RunStatus, attempt_text
from shared.gen.runs.v1 import ops_service_pb2, run_pb2, run_service_pb2, workflow_service_pb2

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

RUN_SERVICE = "/runs.v1.RunService/"
WORKFLOW_SERVICE = "/runs.v1.WorkflowService/"
OPS_SERVICE = "/runs.v1.OpsService/"
RUN_STATUSES = [n.removeprefix("RUN_STATUS_") for n in run_pb2.RunStatus.keys() if not n.endswith("UNSPECIFIED")]
# The run page's script listens for these Server-Sent Events; the terminal ones end its log.
EVENT_TYPES = [e.value for e in EventType]
TERMINAL_TYPES = sorted(e.value for e in TERMINAL_EVENTS)
PAGE_SIZE = 25  # runs per page unless ?page_size= says (the servicer caps it)
COUNTS_SECONDS = 10.0  # the runs page's counts by status (GetStats) are fetched at most this often per caller
MAX_COUNTS_CACHED = 1000  # callers whose counts are kept
MAX_LOGIN_BYTES = 8192  # the login form's body (a key is at most 200 characters)
MAX_SHOWN = 20_000  # characters of a step's input or output shown on the page
MARKS = {"cache_hit": "cache hit", "reused_from_base": "reused"}
# Pages run only this origin's script and are never framed (the cancel button is not to be clickjacked);
# inline style attributes place the timeline's bars.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def when(message: Message, name: str) -> datetime | None:
    """A Timestamp field as an aware datetime, None when unset."""
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


def ago(moment: datetime | None, now: datetime) -> str:
    """How long ago, shortly: just now, 12s ago, 4m 03s ago, 3d ago."""
    if moment is None:
        return ""
    seconds = max((now - moment).total_seconds(), 0.0)
    if seconds < 1:
        return "just now"
    return (f"{int(seconds // 86400)}d" if seconds >= 86400 * 2 else dag.duration(seconds)) + " ago"


def span(start: datetime | None, end: datetime | None, now: datetime) -> str:
    """The duration from start to end (or now while it goes on); "" when never started."""
    if start is None:
        return ""
    return dag.duration(max(((end or now) - start).total_seconds(), 0.0))


def pretty(message: Message | None) -> str:
    """A Struct (or any message) as indented JSON for a <pre>, cut when long."""
    if message is None or not message.ByteSize():
        return ""
    text = json.dumps(json_format.MessageToDict(message), indent=2, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "\n…"


def short(enum_name: str) -> str:
    """RUN_STATUS_RUNNING -> RUNNING (and STEP_STATUS_, TOOL_CALL_STATUS_)."""
    for prefix in ("RUN_STATUS_", "STEP_STATUS_", "TOOL_CALL_STATUS_"):
        if enum_name.startswith(prefix):
            return enum_name.removeprefix(prefix)
    return enum_name


def safe_next(value: str) -> str:
    """A same-site path to go to after login (anything else: the runs page)."""
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


def artifact_url(run_id: str, step_key: str, name: str) -> str:
    """The download link of an artifact (GET /v1/runs/{id}/artifacts/{step}/{name})."""
    return f"/v1/runs/{quote(run_id, safe='')}/artifacts/{quote(step_key, safe='')}/{quote(name, safe='/')}"


def cookie_secure(http_addr: str | None) -> bool:
    """Whether the key cookie is Secure: always, unless the HTTP side listens on a loopback address
    (None: not known, so Secure). The request's own scheme is no guide: behind a TLS terminator it is http."""
    return not (http_addr and is_loopback(http_addr))


def spec_dependencies(spec: workflow_service_pb2.WorkflowSpec) -> dict[str, list[str]]:
    """Each step's dependencies, in the spec's order."""
    return {step.key: list(step.depends_on) for step in spec.steps}


class Pages:
    """The dashboard's routes over `gateway`, rendered with the templates under templates/."""

    def __init__(self, gateway: Gateway, secure_cookie: bool = True) -> None:
        self.gateway = gateway
        self.secure_cookie = secure_cookie
        self.templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
        self.templates.env.globals.update(statuses=RUN_STATUSES, event_types=EVENT_TYPES,
                                          terminal_types=TERMINAL_TYPES)
        # GetStats (a scan of the caller's runs) per caller, so open runs tabs polling every 2 s do not repeat it.
        self._counts: dict[str, tuple[float, Any]] = {}

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def auth_on(self) -> bool:
        return self.gateway.authenticator.mode != "off"

    async def call(self, request: Request, method: str, message: Message) -> Any:
        """The servicer's answer to `method` as the request's caller (errors propagate)."""
        return await self.gateway.call(request, method, message)

    async def maybe(self, request: Request, method: str, message: Message) -> Any:
        """`call`, or None when the caller may not (e.g. OpsService for a client key) or it fails."""
        try:
            return await self.call(request, method, message)
        except RunsError:
            return None

    def render(self, request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        context = {
            "auth_on": self.auth_on,
            "logged_in": bool(request.cookies.get(KEY_COOKIE)),
            "path": request.url.path,
            **context,
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status_code, headers=PAGE_HEADERS)

    def failure(self, request: Request, exc: BaseException, where: str) -> Response:
        """The page for an error: the login form for 401, else a short error page with the status."""
        error = translate(exc)
        if error is None:
            log.error("unhandled error in the dashboard's %s", where, exc_info=exc)
            return self.render(request, "error.html", {"status": 500, "message": "internal error"}, 500)
        status = http_status(error)
        if isinstance(error, Unauthenticated) or status == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            # Say why only when a key was sent (revoked, expired, unknown); without one the form says enough.
            said = error.message if self.gateway.key_of(request)[0] else ""
            return self.login_form(request, safe_next(target), said, 401)
        return self.render(request, "error.html", {"status": status, "code": error.code.name,
                                                   "message": error.message}, status)

    def page(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """A page handler whose errors become the error page (or the login form)."""

        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return self.failure(request, exc, handler.__name__)

        endpoint.__name__ = handler.__name__
        return endpoint

    # --- login -------------------------------------------------------------------------------

    def login_form(self, request: Request, next_path: str, message: str = "", status_code: int = 200) -> Response:
        return self.render(request, "login.html", {"next": next_path, "message": message, "title": "Log in"},
                           status_code)

    def cross_site(self, request: Request) -> Response | None:
        """The refusal of a form POST from another origin (login CSRF, forced logout), else None."""
        if same_origin(request):
            return None
        error = PermissionDenied("this form is accepted only from this dashboard's own pages "
                                 "(a proxy in front must pass the Host header through)")
        return self.render(request, "error.html", {"status": 403, "code": error.code.name,
                                                   "message": error.message}, 403)

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.login_form(request, safe_next(request.query_params.get("next", "/")))
        refused = self.cross_site(request)
        if refused is not None:
            return refused
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BYTES:
                return self.render(request, "error.html", {"status": 413, "message": "the form is too large"}, 413)
        form = parse_qs(body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        next_path = safe_next((form.get("next") or ["/"])[0])
        try:
            # The same check as a call to ListRuns with this key (a worker key may not, an unknown one is refused).
            metadata = (("authorization", f"Bearer {key}"),) if key else ()
            authenticator = self.gateway.authenticator
            await authenticator.caller(RUN_SERVICE + "ListRuns", metadata, authenticator.clock())
        except RunsError as err:
            return self.login_form(request, next_path, err.message, http_status(err))
        response = RedirectResponse(next_path, status_code=303)
        if key:
            response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", secure=self.secure_cookie,
                                path="/")
        return response

    async def logout(self, request: Request) -> Response:
        refused = self.cross_site(request)
        if refused is not None:
            return refused
        response = RedirectResponse("/login" if self.auth_on else "/", status_code=303)
        response.delete_cookie(KEY_COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure_cookie)
        return response

    # --- runs --------------------------------------------------------------------------------

    async def counts_by_status(self, request: Request, fresh: bool) -> Any:
        """GetStats for the request's caller (None when refused): for the live table's polls at most every
        COUNTS_SECONDS per caller, for a page load (`fresh`) always. Called after the caller's ListRuns
        succeeded, so a revoked key never reads a kept answer."""
        key = self.gateway.key_of(request)[0] or ""
        caller = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        kept = self._counts.get(caller)
        if not fresh and kept is not None and now - kept[0] < COUNTS_SECONDS:
            return kept[1]
        stats = await self.maybe(request, OPS_SERVICE + "GetStats", ops_service_pb2.GetStatsRequest())
        self._counts.pop(caller, None)
        self._counts[caller] = (time.monotonic(), stats)
        while len(self._counts) > MAX_COUNTS_CACHED:
            del self._counts[next(iter(self._counts))]  # the oldest
        return stats

    async def runs_context(self, request: Request, fresh: bool = True) -> dict[str, Any]:
        """The runs table's data for the filters in the query string (read as GET /v1/runs reads it);
        `fresh`: counts by status fetched now, else possibly kept from up to COUNTS_SECONDS ago."""
        # The filter form sends its empty fields too (?status=&workflow=): an empty one is no filter.
        filled = [(k, v.strip()) for k, v in request.query_params.multi_items() if v.strip()]
        message = run_service_pb2.ListRunsRequest()
        from_query(Request({**request.scope, "query_string": urlencode(filled).encode()}), message)
        if not message.page_size:
            message.page_size = PAGE_SIZE
        q = request.query_params
        filters = {"status": q.get("status", "").upper(), "workflow": q.get("workflow", "").strip(),
                   "query": q.get("query", "").strip(), "page_size": q.get("page_size", "").strip()}
        response = await self.call(request, RUN_SERVICE + "ListRuns", message)
        stats = await self.counts_by_status(request, fresh)
        now = datetime.now(UTC)
        rows = []
        for run in response.runs:
            status = short(run_pb2.RunStatus.Name(run.status))
            created, started, finished = when(run, "created_at"), when(run, "started_at"), when(run, "finished_at")
            rows.append({
                "id": run.run_id, "status": status, "workflow": run.workflow, "version": run.workflow_version,
                "created": created.isoformat() if created else "", "age": ago(created, now),
                "duration": span(started, finished, now),
                "tries": attempt_text(run.attempt, run.max_attempts, run.released_attempts),
                "trigger": run.trigger, "key": run.idempotency_key,
            })
        counts = None
        if stats is not None:
            counts = [(s, int(stats.runs_by_status.get(s, stats.runs_by_status.get("RUN_STATUS_" + s, 0))))
                      for s in RUN_STATUSES]
        kept = {k: v for k, v in filters.items() if v}
        token = q.get("page_token", "").strip()
        return {
            "rows": rows, "counts": counts, "filters": filters,
            "query": urlencode(kept), "page_token": q.get("page_token", ""),
            "next_page": urlencode({**kept, "page_token": response.next_page_token})
            if response.next_page_token else "",
            "first_page": urlencode(kept),
            "live_url": "/ui/runs?" + urlencode({**kept, "page_token": token} if token else kept),
        }

    async def runs(self, request: Request) -> Response:
        context = await self.runs_context(request)
        return self.render(request, "runs.html", {**context, "title": "Runs"})

    async def runs_live(self, request: Request) -> Response:
        return self.render(request, "_runs_live.html", await self.runs_context(request, fresh=False))

    # --- one run -----------------------------------------------------------------------------

    async def run_context(self, request: Request) -> dict[str, Any]:
        """Everything the run page shows, from GetRun and the run's workflow version."""
        run_id = request.path_params["run_id"]
        got = await self.call(request, RUN_SERVICE + "GetRun", run_service_pb2.GetRunRequest(run_id=run_id))
        run = got.run
        workflow = await self.maybe(request, WORKFLOW_SERVICE + "GetWorkflow", workflow_service_pb2.GetWorkflowRequest(
            name=run.workflow, version=run.workflow_version))
        now = datetime.now(UTC)
        steps = {s.step_key: s for s in got.steps}
        calls: dict[str, list[Any]] = {}
        for call in got.tool_calls:
            calls.setdefault(call.step_key, []).append(call)
        for items in calls.values():
            items.sort(key=lambda c: (c.step_attempt, c.attempt))
        if workflow is not None:
            deps = spec_dependencies(workflow.workflow.spec)
            tools = {s.key: s.tool for s in workflow.workflow.spec.steps}
            change_requests = sorted(workflow.workflow.spec.change_requests)
        else:  # the version is gone or not visible: draw what the steps say
            deps = {s.step_key: list(s.depends_on) for s in got.steps}
            tools, change_requests = {}, []
        for key in steps:
            deps.setdefault(key, list(steps[key].depends_on))
        status = {key: short(run_pb2.StepStatus.Name(s.status)).lower() for key, s in steps.items()}
        status = {key: status.get(key, "pending") for key in deps}
        marks = {key: MARKS.get(s.reason, s.reason) for key, s in steps.items()
                 if short(run_pb2.StepStatus.Name(s.status)) == "SKIPPED" and s.reason}
        for key, s in steps.items():
            tools[key] = s.tool or tools.get(key, "")
            if s.cache_result == "hit" and key not in marks:
                marks[key] = "cache hit"
        graph = dag.layout(deps, status, tools, marks)
        lanes: list[tuple[str, Sequence[dag.Interval]]] = []
        for key in deps:
            tries: list[dag.Interval] = []
            for call in calls.get(key, []):
                start = when(call, "invoked_at")
                if start is not None:
                    state = short(run_pb2.ToolCallStatus.Name(call.status)).lower()
                    if state == "failed" and status[key] == "canceled" and call is calls[key][-1]:
                        state = "canceled"  # the try a cancel stopped
                    label = f"try {call.step_attempt or len(tries) + 1}"
                    tries.append((start, when(call, "finished_at"), state, label))
            step = steps.get(key)
            if not tries and step is not None and when(step, "started_at") is not None:
                tries.append((when(step, "started_at"), when(step, "finished_at"),  # type: ignore[arg-type]
                              status[key], status[key]))
            lanes.append((key, tries))
        chart = dag.timeline(lanes, now)
        details = []
        for key in deps:
            step = steps.get(key)
            last = calls.get(key, [])[-1] if calls.get(key) else None
            if step is None:
                details.append({"key": key, "status": "pending", "tool": tools.get(key, ""), "tries": 0})
                continue
            started, finished = when(step, "started_at"), when(step, "finished_at")
            details.append({
                "key": key, "status": status[key], "tool": step.tool, "tries": step.attempt,
                "duration": span(started, finished, now),
                "started": started.isoformat() if started else "",
                "input": pretty(last.input) if last is not None else "",
                "output": pretty(step.output),
                "error": step.error, "error_code": step.step_error.code,
                "reason": step.reason, "mark": marks.get(key, ""),
                "cache": {"key": step.cache_display or step.cache_key, "result": step.cache_result,
                          "reason": step.cache_reason} if step.cache_key or step.cache_result else None,
                "source_run_id": step.source_run_id,
                "artifacts": [{"name": a.name, "size": a.size, "media_type": a.media_type,
                               "url": artifact_url(run.run_id, key, a.name)} for a in step.artifacts],
                "calls": [{"try": c.step_attempt, "status": short(run_pb2.ToolCallStatus.Name(c.status)),
                           "error": c.error,
                           "duration": span(when(c, "invoked_at"), when(c, "finished_at"), now)}
                          for c in calls.get(key, [])],
            })
        run_status = short(run_pb2.RunStatus.Name(run.status))
        created, started, finished = when(run, "created_at"), when(run, "started_at"), when(run, "finished_at")
        attempts = [{"attempt": a.attempt, "worker": a.worker_id, "outcome": a.outcome, "error": a.error,
                     "duration": span(when(a, "claimed_at"), when(a, "ended_at"), now)} for a in got.attempts]
        terminal = run_status in TERMINAL_STATUSES
        return {
            "run": run, "status": run_status, "terminal": terminal,
            "attempt": attempt_text(run.attempt, run.max_attempts, run.released_attempts),
            "age": ago(created, now), "created": created.isoformat() if created else "",
            "duration": span(started, finished, now),
            "input": pretty(run.input), "output": pretty(run.output),
            "graph": graph, "timeline": chart, "steps": details, "attempts": attempts,
            "lane_notes": {key: marks.get(key) or status[key] for key in deps},
            # Cancel is offered until the run ends (the handler refuses what it must; the page shows why);
            # only a SUCCEEDED run is rebuilt (rebuild.py's rule).
            "can_cancel": not terminal,
            "can_rebuild": run_status == RunStatus.SUCCEEDED, "change_requests": change_requests,
            "summary": run.steps_summary,
        }

    async def run_page(self, request: Request) -> Response:
        context = await self.run_context(request)
        return self.render(request, "run.html", {**context, "title": f"Run {context['run'].run_id}"})

    async def run_live(self, request: Request) -> Response:
        return self.render(request, "_run_live.html", await self.run_context(request))

    # --- workflows, workers, stats -----------------------------------------------------------

    def workflow_view(self, workflow: Any) -> dict[str, Any]:
        spec = workflow.spec
        return {
            "name": workflow.name, "version": workflow.version, "description": spec.description,
            "builtin": workflow.builtin, "spec_hash": workflow.spec_hash,
            "created": when(workflow, "created_at"),
            "graph": dag.layout(spec_dependencies(spec), tools={s.key: s.tool for s in spec.steps}),
            "steps": [{"key": s.key, "tool": s.tool, "depends_on": list(s.depends_on),
                       "cache": s.cache.scope or "none", "tries": s.retry.max_attempts or 1,
                       "timeout": s.timeout_seconds} for s in spec.steps],
            "change_requests": [(name, list(spec.change_requests[name].step_keys))
                                for name in sorted(spec.change_requests)],
        }

    async def workflows(self, request: Request) -> Response:
        token = request.query_params.get("page_token", "")
        response = await self.call(request, WORKFLOW_SERVICE + "ListWorkflows",
                                   workflow_service_pb2.ListWorkflowsRequest(page_size=20, page_token=token))
        return self.render(request, "workflows.html", {
            "title": "Workflows", "workflows": [self.workflow_view(w) for w in response.workflows],
            "next_page": response.next_page_token,
        })

    async def workflow(self, request: Request) -> Response:
        message = workflow_service_pb2.GetWorkflowRequest()
        from_query(request, message, name=request.path_params["name"])
        response = await self.call(request, WORKFLOW_SERVICE + "GetWorkflow", message)
        latest = response.workflow.version
        if message.version:
            newest = await self.maybe(request, WORKFLOW_SERVICE + "GetWorkflow",
                                      workflow_service_pb2.GetWorkflowRequest(name=request.path_params["name"]))
            latest = newest.workflow.version if newest is not None else latest
        view = self.workflow_view(response.workflow)
        return self.render(request, "workflow.html", {"title": view["name"], "w": view, "latest": latest})

    async def workers(self, request: Request) -> Response:
        token = request.query_params.get("page_token", "")
        response = await self.call(request, OPS_SERVICE + "ListWorkers",
                                   ops_service_pb2.ListWorkersRequest(page_size=100, page_token=token))
        now = datetime.now(UTC)
        workers = [{
            "id": w.worker_id, "connected": w.connected, "tools": list(w.tools), "capacity": w.capacity,
            "held": w.held_count, "held_runs": list(w.held_run_ids)[:20], "workspace": w.workspace_id,
            "heartbeat": ago(when(w, "last_heartbeat_at"), now), "started": ago(when(w, "started_at"), now),
        } for w in response.workers]
        return self.render(request, "workers.html", {
            "title": "Workers", "workers": workers, "connected": response.connected,
            "next_page": response.next_page_token,
        })

    async def stats(self, request: Request) -> Response:
        stats = await self.call(request, OPS_SERVICE + "GetStats", ops_service_pb2.GetStatsRequest())
        counters = [(f.name, getattr(stats, f.name)) for f in stats.DESCRIPTOR.fields
                    if f.type in (f.TYPE_INT64, f.TYPE_INT32)]
        throughput = await self.call(request, OPS_SERVICE + "GetThroughput",
                                     ops_service_pb2.GetThroughputRequest(minutes=60))
        return self.render(request, "stats.html", {
            "title": "Stats", "counters": counters, "tenant": stats.tenant_id,
            "by_status": sorted(stats.runs_by_status.items()),
            "hits": sorted(stats.cache_hits_by_layer.items()), "misses": sorted(stats.cache_misses_by_reason.items()),
            "charts": throughput_charts(throughput.buckets),
        })

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.page(self.runs), methods=["GET"]),
            Route("/ui/runs", self.page(self.runs_live), methods=["GET"]),
            Route("/runs/{run_id}", self.page(self.run_page), methods=["GET"]),
            Route("/ui/runs/{run_id}", self.page(self.run_live), methods=["GET"]),
            Route("/workflows", self.page(self.workflows), methods=["GET"]),
            Route("/workflows/{name}", self.page(self.workflow), methods=["GET"]),
            Route("/workers", self.page(self.workers), methods=["GET"]),
            Route("/stats", self.page(self.stats), methods=["GET"]),
            Route("/login", self.page(self.login), methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
        ]


def throughput_charts(buckets: Sequence[Any]) -> list[dict[str, Any]]:
    """The stats page's two charts from GetThroughput's per-minute buckets: finished runs (stacked by
    final status) and queue depth."""
    if not buckets:
        return []
    first, last = when(buckets[0], "start"), when(buckets[-1], "start")
    labels = (first.strftime("%H:%M") if first else "", last.strftime("%H:%M") if last else "")
    finished = chart("Finished runs per minute", [
        ("succeeded", [b.succeeded for b in buckets]), ("failed", [b.failed for b in buckets]),
        ("canceled", [b.canceled for b in buckets]),
    ], labels)
    depth = chart("Queue depth", [("queued", [b.queue_depth for b in buckets])], labels)
    return [finished, depth]


def chart(
    title: str, series: Sequence[tuple[str, Sequence[int]]], labels: tuple[str, str],
    width: int = 480, height: int = 110,
) -> dict[str, Any]:
    """A stacked bar chart's geometry for the template: one column per point, a rect per series."""
    points = len(series[0][1]) if series else 0
    totals = [sum(values[i] for _, values in series) for i in range(points)]
    top = max(totals, default=0) or 1
    step = width / max(points, 1)
    columns = []
    for i in range(points):
        y, rects = float(height), []
        for name, values in series:
            h = values[i] / top * (height - 4)
            if h > 0:
                y -= h
                rects.append({"cls": name, "y": round(y, 2), "h": round(h, 2), "v": values[i]})
        columns.append({"x": round(i * step + 0.5, 2), "w": round(max(step - 1, 0.5), 2), "rects": rects,
                        "total": totals[i]})
    return {"title": title, "columns": columns, "width": width, "height": height, "max": max(totals, default=0),
            "sum": sum(totals), "last": totals[-1] if totals else 0, "series": [n for n, _ in series],
            "labels": labels}


def routes(gateway: Gateway, http_addr: str | None = None) -> list[BaseRoute]:
    """The dashboard's routes (pages, fragments, login, /static) over `gateway`; `http_addr` is the
    address the HTTP side listens on (the key cookie is Secure unless it is loopback; None: Secure)."""
    return Pages(gateway, secure_cookie=cookie_secure(http_addr)).routes()
