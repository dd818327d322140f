"""The dashboard in a real browser: Playwright driving Debian's Chromium against a real API and worker.

The API and one worker (with the shell tool) are shared by the tests of this module on a database
of its own; the login test starts its own API with RUNS_AUTH=required. A step is held RUNNING by a
shell step that waits for a file the test creates (`GATE_SPEC`), so the page can be watched
turning it from running to succeeded without a reload. Each test saves a screenshot under its
tmp_path; with RUNS_UPDATE_SCREENSHOTS=1 the campaign run page is also saved to docs/run-page.png
(the README's picture).

Chromium is /usr/bin/chromium (`make chromium` installs Debian's package when it is missing);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from features.harness import Api, Client, Worker, create_key, wait_until
from services.run_api.auth import Authenticator
from services.run_api.http import dag, pages
from services.run_api.http.gateway import Gateway
from shared.events import TERMINAL_EVENTS, EventType

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("RUNS_TEST_CHROMIUM", "/usr/bin/chromium")
DOC_SCREENSHOT = ROOT / "docs" / "run-page.png"
TOOLS = {"RUN_WORKER_TOOLS": "noop,echo,sleep,fail,shell"}
WAIT_MS = 20_000  # Playwright's expectations (the page updates within a second or two)

# Waits (bounded) for the file named by the step input's `gate`; the test creates it to let the step end.
WAIT_FOR_GATE = """
import json, os, sys, time
from pathlib import Path
gate = Path(json.loads(Path(os.environ["RUNS_INPUT"]).read_text())["gate"])
deadline = time.monotonic() + 60
while not gate.exists():
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.05)
"""
GATE_SPEC: dict[str, Any] = {
    "name": "dashboard.gate",
    "description": "prepare -> (wait || side) -> finish; wait holds until the gate file exists",
    "steps": [
        {"key": "prepare", "tool": "noop"},
        {"key": "wait", "tool": "shell", "depends_on": ["prepare"], "input": {"gate": "input.gate"},
         "args": {"command": ["python3", "-c", WAIT_FOR_GATE]}, "timeout_seconds": 60},
        {"key": "side", "tool": "noop", "depends_on": ["prepare"]},
        {"key": "finish", "tool": "noop", "depends_on": ["wait", "side"]},
    ],
}
expect.set_options(timeout=WAIT_MS)
CAMPAIGN_INPUT = {"product": "Acme Rockets", "audience": "coyotes", "color": "#d9480f"}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_database(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[str]:
    """A fresh database for this module's shared API (copied from the migrated template)."""
    with make_database() as url:
        yield url


def _stop(*processes: Any) -> None:
    for process in processes:
        process.stop()
        print(f"--- {process.name} ---\n{process.output()[-4000:]}")
        process.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def api(module_database: str) -> Iterator[Api]:
    """One API (auth off) and one worker that runs shell steps, for the module."""
    store = tempfile.mkdtemp(prefix="runs-dashboard-artifacts-")
    api = Api(module_database, RUNS_AUTH="off", RUNS_ARTIFACTS_URL=store)
    worker = Worker(api.addr, RUN_WORKER_POLL_MS="100", RUN_WORKER_ID="dashboard-worker",
                    RUN_WORKER_DRAIN_SECONDS="2", **TOOLS)
    try:
        api.start()
        worker.start()
        yield api
    finally:
        _stop(worker, api)
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def client(api: Api) -> Iterator[Client]:
    c = Client(api.addr)
    c.register(GATE_SPEC)
    yield c
    c.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium"
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context's page (laptop-sized); a screenshot of it is saved after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(tmp_path / f"{request.node.name}-end.png"), full_page=True)
        context.close()


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot under the test's tmp_path."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def node(page: Any, key: str) -> Any:
    """The DAG box of step `key` on a run page."""
    return page.locator(f'#run-dag g.node[data-step="{key}"]')


# --- tests ---------------------------------------------------------------------------------------


def test_runs_page_lists_a_started_run_and_updates_it_live(api: Api, client: Client, page: Any,
                                                           tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run = client.start(GATE_SPEC["name"], {"gate": str(gate)}).run
    page.goto(api.http_url + "/")
    row = page.locator(f'tr[data-run="{run.run_id}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text(GATE_SPEC["name"])
    expect(row.locator(".badge")).to_have_text("running")
    expect(page.locator(".counts")).to_contain_text("running")  # counts by status (auth off: allowed)
    page.evaluate("window.__same_page = 1")
    shot(page, tmp_path, "runs-running")
    gate.touch()
    expect(row.locator(".badge")).to_have_text("succeeded")  # the 2 s poll, no reload
    assert page.evaluate("window.__same_page") == 1
    # Search by idempotency key prefix, and by run id prefix.
    keyed = client.start("", {}, idempotency_key="dash-search-42").run
    page.fill("input[name=query]", "dash-search")
    page.locator(".filters button[type=submit]").click()
    expect(page.locator("table.runs tbody tr[data-run]")).to_have_count(1)
    expect(page.locator(f'tr[data-run="{keyed.run_id}"]')).to_be_visible()
    page.goto(api.http_url + "/?query=" + run.run_id[:20].lower())
    expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible()
    # Paging: one run a page (this test started two), the next page has the other.
    page.goto(api.http_url + "/?page_size=1")
    rows = page.locator("table.runs tbody tr[data-run]")
    expect(rows).to_have_count(1)
    shown = rows.first.get_attribute("data-run")
    page.get_by_text("Next page").click()
    expect(page.get_by_text("First page")).to_be_visible()
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-run") != shown
    # Filters: another status hides it, its own shows it.
    page.goto(api.http_url + "/?status=FAILED")
    expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_have_count(0)
    page.goto(api.http_url + f"/?status=SUCCEEDED&workflow={GATE_SPEC['name']}")
    expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible()
    shot(page, tmp_path, "runs-filtered")


def test_run_page_shows_the_dag_and_a_step_turning_from_running_to_succeeded(
    api: Api, client: Client, page: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    run = client.start(GATE_SPEC["name"], {"gate": str(gate)}).run
    page.goto(f"{api.http_url}/runs/{run.run_id}")
    expect(page.locator("#run-dag g.node")).to_have_count(4)
    expect(page.locator("#run-dag path.edge")).to_have_count(4)
    # The script listens for shared.events' types and ends the log on its terminal ones (no copy in app.js).
    live = page.locator("#run-live")
    assert live.get_attribute("data-event-types").split() == [e.value for e in EventType]
    assert live.get_attribute("data-terminal-types").split() == sorted(e.value for e in TERMINAL_EVENTS)
    assert "run.completed" not in (ROOT / "services/run_api/http/static/app.js").read_text()
    expect(node(page, "wait")).to_have_attribute("data-status", "running")
    expect(node(page, "prepare")).to_have_attribute("data-status", "succeeded")
    expect(node(page, "finish")).to_have_attribute("data-status", "created")
    # Columns from the graph's layers: prepare, then wait and side together, then finish.
    xs = {k: float(node(page, k).get_attribute("transform").split("(")[1].split(",")[0])
          for k in ("prepare", "wait", "side", "finish")}
    assert xs["prepare"] < xs["wait"] == xs["side"] < xs["finish"]
    page.evaluate("window.__same_page = 1")
    shot(page, tmp_path, "run-running")
    gate.touch()
    expect(node(page, "wait")).to_have_attribute("data-status", "succeeded")
    expect(node(page, "finish")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    assert page.evaluate("window.__same_page") == 1, "the page was reloaded"
    expect(page.locator('#events tr[data-type="run.completed"]')).to_have_count(1)
    expect(page.locator("#events-state")).to_contain_text("ended")
    expect(page.locator(".gantt .lane .bar")).to_have_count(4)  # one try per step
    shot(page, tmp_path, "run-succeeded")


def test_cancel_from_the_page_ends_the_run_canceled(api: Api, client: Client, page: Any, tmp_path: Path) -> None:
    run = client.start(GATE_SPEC["name"], {"gate": str(tmp_path / "never")}).run
    page.goto(f"{api.http_url}/runs/{run.run_id}")
    expect(node(page, "wait")).to_have_attribute("data-status", "running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    expect(page.locator("#run-status")).to_have_text("canceled")
    expect(node(page, "wait")).to_have_attribute("data-status", "canceled")
    assert client.status(run.run_id) == "CANCELED"
    assert client.get(run.run_id).run.cancel_reason == "canceled from the dashboard"
    expect(page.locator("#cancel")).to_have_count(0)
    shot(page, tmp_path, "run-canceled")


def test_campaign_run_page_artifacts_and_a_rebuild_with_a_preview(
    api: Api, client: Client, page: Any, tmp_path: Path
) -> None:
    run = client.start("campaign.build", CAMPAIGN_INPUT).run
    client.wait_status(run.run_id, {"SUCCEEDED", "FAILED"}, 60)
    assert client.status(run.run_id) == "SUCCEEDED"
    page.goto(f"{api.http_url}/runs/{run.run_id}")
    expect(page.locator("#run-dag g.node")).to_have_count(5)
    for key in ("brief", "copy", "images", "landing_page", "bundle"):
        expect(node(page, key)).to_have_attribute("data-status", "succeeded")
    links = page.locator("ul.artifacts a")
    expect(links).to_have_count(5)
    href = links.nth(0).get_attribute("href")
    assert href == f"/v1/runs/{run.run_id}/artifacts/brief/brief.txt"
    download = page.request.get(api.http_url + href)
    assert download.status == 200 and download.body().startswith(b"Campaign brief")
    # Rebuild: preview the plan of copy_update first, then rebuild.
    page.select_option("#rebuild-form select", "copy_update")
    page.locator("#rebuild-preview").click()
    plan = page.locator("#rebuild-result table.plan")
    expect(plan.locator('tr[data-step="copy"] td.act-rerun')).to_be_visible()
    expect(plan.locator('tr[data-step="brief"] td.act-reuse')).to_be_visible()
    page.locator("#rebuild-go").click()
    page.wait_for_url(lambda url: "/runs/" in url and run.run_id not in url)
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=60_000)
    expect(node(page, "brief")).to_have_attribute("data-status", "skipped")
    expect(node(page, "brief")).to_contain_text("reused")
    expect(node(page, "copy")).to_have_attribute("data-status", "succeeded")
    page.locator("details#step-brief summary").click()
    expect(page.locator("details#step-brief")).to_contain_text("reused_from_base")
    page.locator("details#step-brief summary").click()
    page.locator("details#step-copy summary").click()
    expect(page.locator("details#step-copy")).to_contain_text("copy.txt")
    path = shot(page, tmp_path, "run-rebuild")
    assert path.stat().st_size > 0
    if os.environ.get("RUNS_UPDATE_SCREENSHOTS") == "1":  # the README's picture: the top of the page
        DOC_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(DOC_SCREENSHOT), clip={"x": 0, "y": 0, "width": 1280, "height": 1000})
    # The workflows page draws the campaign's graph with its change requests and versions.
    page.goto(f"{api.http_url}/workflows")
    card = page.locator("#wf-campaign\\.build")
    expect(card.locator("g.node")).to_have_count(5)
    expect(card).to_contain_text("copy_update")
    shot(page, tmp_path, "workflows")
    card.locator("h2 a").click()  # one workflow: its steps
    expect(page.locator("table.mini tr")).to_have_count(6)
    expect(page.locator("table.mini")).to_contain_text("landing_page")
    # Stats: finished runs and queue depth over the last hour; workers: the one connected.
    page.goto(f"{api.http_url}/stats")
    expect(page.locator("figure.chart")).to_have_count(2)
    expect(page.locator("figure.chart rect.s-succeeded").first).to_be_attached()
    shot(page, tmp_path, "stats")
    page.goto(f"{api.http_url}/workers")
    worker = page.locator("table.workers tbody tr", has_text="dashboard-worker")
    expect(worker.locator(".badge")).to_have_text("connected")
    shot(page, tmp_path, "workers")


def test_a_failed_step_is_drawn_failed_with_its_error(api: Api, client: Client, page: Any, tmp_path: Path) -> None:
    run = client.start_tool("fail", {"retryable": False, "message": "the printer is on fire"}, max_attempts=1)
    client.wait_status(run.run_id, {"FAILED"}, 30)
    response = page.goto(f"{api.http_url}/runs/{run.run_id}")
    assert response is not None and "frame-ancestors 'none'" in response.headers["content-security-policy"]
    expect(page.locator("#run-status")).to_have_text("failed")
    expect(node(page, "runtime")).to_have_attribute("data-status", "failed")
    page.locator("details#step-runtime summary").click()
    expect(page.locator("details#step-runtime .flash.bad")).to_contain_text("the printer is on fire")
    expect(page.locator("#rebuild")).to_be_hidden()  # only a succeeded run is rebuilt
    shot(page, tmp_path, "run-failed")


def test_unknown_run_renders_the_error_page_with_its_status(api: Api, page: Any) -> None:
    response = page.goto(f"{api.http_url}/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert response is not None and response.status == 404
    expect(page.locator(".error-page")).to_contain_text("NOT_FOUND")
    response = page.goto(f"{api.http_url}/?status=NOPE")
    assert response is not None and response.status == 400


def test_query_strings_are_read_as_the_json_api_reads_them(api: Api, client: Client) -> None:
    """The dashboard builds its requests with routes.from_query and lets the servicer judge them."""
    with httpx.Client(base_url=api.http_url, timeout=10) as http:
        # A digit Python's isdigit() accepts but int() does not: 400, never a 500 with a stack.
        for url in ("/?page_size=%C2%B2", "/ui/runs?page_size=%C2%B2",
                    "/workflows/dashboard.gate?version=%C2%B2", "/workflows/dashboard.gate?version=%C2%B2%C2%B2"):
            response = http.get(url)
            assert response.status_code == 400, (url, response.status_code)
            assert "page_size" in response.text or "version" in response.text
        assert http.get("/?page_size=300").status_code == 200  # the servicer's limit (500 at most), not a copy
        negative = http.get("/?page_size=-1")
        assert negative.status_code == 400 and "must not be negative" in negative.text  # the servicer's words
        assert http.get("/?colour=red").status_code == 400  # an unknown parameter, as GET /v1/runs says
        assert http.get("/?status=running&workflow=&query=").status_code == 200  # the filter form's empty fields
        assert http.get("/workflows/dashboard.gate?version=1").status_code == 200


def test_login_and_logout_are_refused_from_another_origin(api: Api) -> None:
    """Login CSRF (the attacker's key in the victim's browser) and forced logout: refused unless same-origin."""
    form = {"key": "runs_attackers-key", "next": "/"}
    foreign: list[dict[str, str]] = [
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {"Origin": api.http_url.replace("127.0.0.1", "localhost")},  # another origin on this machine
    ]
    host = api.http_url.removeprefix("http://")
    with httpx.Client(base_url=api.http_url, timeout=10, cookies={"runs_key": "the-victims-key"}) as http:
        for headers in foreign:
            login = http.post("/login", data=form, headers=headers)
            assert login.status_code == 403, headers
            assert "set-cookie" not in login.headers, headers
            logout = http.post("/logout", headers=headers)
            assert logout.status_code == 403, headers
            assert "set-cookie" not in logout.headers, headers  # the cookie is not cleared
        # The dashboard's own forms (a browser sends its origin) and clients that send neither header pass.
        for headers in ({"Origin": api.http_url, "Sec-Fetch-Site": "same-origin"}, {"Origin": f"http://{host}"}, {}):
            login = http.post("/login", data=form, headers=headers)
            assert login.status_code == 303 and "runs_key=" in login.headers["set-cookie"], headers
            logout = http.post("/logout", headers=headers)
            assert logout.status_code == 303 and "runs_key=" in logout.headers["set-cookie"], headers


@pytest.mark.parametrize(("http_addr", "secure"), [
    ("127.0.0.1:8080", False), ("[::1]:8080", False), ("localhost:8080", False),
    ("0.0.0.0:8080", True), ("[::]:8080", True), ("10.0.0.5:8080", True), ("runs.example.com:80", True),
    (None, True),
])
def test_the_key_cookie_is_secure_unless_the_http_address_is_loopback(http_addr: str | None, secure: bool) -> None:
    """Behind a TLS terminator the request's scheme is http: the flag follows the address the API listens on.
    (The dashboard's app alone, in this process: auth off never reads the database.)"""
    gateway = Gateway(Authenticator(cast(Any, None), "off"), {})
    app = Starlette(routes=pages.routes(gateway, http_addr=http_addr))

    async def login_and_logout() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://runs.internal:8080") as http:
            return (await http.post("/login", data={"key": "runs_some-key", "next": "/"}),
                    await http.post("/logout"))

    # In a thread of its own: Playwright's sync API may hold this thread's event loop (other tests of the module).
    with ThreadPoolExecutor(1) as pool:
        login, logout = pool.submit(asyncio.run, asyncio.wait_for(login_and_logout(), 10)).result(20)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"].lower()
    assert cookie.startswith("runs_key=") and "httponly" in cookie and "samesite=strict" in cookie
    assert ("; secure" in cookie) is secure, cookie
    assert logout.status_code == 303 and ("; secure" in logout.headers["set-cookie"].lower()) is secure


def _get_stats_calls(http: httpx.Client) -> float:
    """GetStats calls this API answered (its /metrics)."""
    text = http.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "runs_grpc_requests_total" and sample.labels.get("method") == "GetStats")


def test_the_runs_table_polls_counts_by_status_at_most_every_10_seconds(api: Api, client: Client) -> None:
    """Each open runs tab re-fetches the table every 2 s; GetStats (a scan) is not repeated each time."""
    with httpx.Client(base_url=api.http_url, timeout=10) as http:
        before = _get_stats_calls(http)
        for _ in range(6):
            response = http.get("/ui/runs")
            assert response.status_code == 200 and 'class="counts"' in response.text  # the counts are shown
        # Six refreshes in well under 10 s: at most one fetch, or two if a kept answer expired meanwhile.
        assert _get_stats_calls(http) - before <= 2
        # Loading the page (a person's click, not a timer) shows the counts of now.
        before = _get_stats_calls(http)
        assert http.get("/").status_code == 200
        assert _get_stats_calls(http) - before == 1
    assert pages.COUNTS_SECONDS >= 10


def fulfill(route: Any, **response: Any) -> None:
    """A Playwright route handler answering with `response` (a handler of two arguments is given the request too)."""
    route.fulfill(**response)


def test_the_stream_s_own_error_event_is_shown_and_a_refused_cancel_says_why(
    api: Api, client: Client, page: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    run = client.start(GATE_SPEC["name"], {"gate": str(gate)}).run
    page.goto(f"{api.http_url}/runs/{run.run_id}")
    expect(node(page, "wait")).to_have_attribute("data-status", "running")
    expect(page.locator("#cancel")).to_be_visible()
    # The page stops refreshing its fragment (as if the server were slow): the run ends behind its back,
    # so the page still offers Cancel, and the handler's refusal must be shown, not swallowed.
    page.route("**/ui/runs/**", lambda route: route.abort())
    gate.touch()
    client.wait_status(run.run_id, {"SUCCEEDED"}, 30)
    expect(page.locator('#events tr[data-type="run.completed"]')).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    expect(page.locator("#action-result")).to_contain_text("cannot be canceled")
    shot(page, tmp_path, "cancel-refused")
    page.unroute("**/ui/runs/**")
    # The server's error on the stream (`event: runs.error`) is said on the page: a failure (e.g. the
    # server is stopping) and the browser reconnects; a refusal (e.g. the key was revoked) and it stops.
    events_url = f"**/v1/runs/{run.run_id}/events*"
    for code, message, said in (("UNAVAILABLE", "the server is stopping", "reconnecting"),
                                ("UNAUTHENTICATED", "the API key was revoked", "refused")):
        stream = ("retry: 600000\n\n"
                  'id: 1\nevent: run.queued\ndata: {"sequence":"1","type":"run.queued","payload":{}}\n\n'
                  f'event: runs.error\ndata: {{"code":"{code}","message":"{message}"}}\n\n')
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        page.route(events_url, functools.partial(fulfill, status=200, headers=headers, body=stream))
        page.goto(f"{api.http_url}/runs/{run.run_id}")
        expect(page.locator('#events tr[data-type="run.queued"]')).to_have_count(1)
        expect(page.locator("#events-state")).to_contain_text(message)
        expect(page.locator("#events-state")).to_contain_text(said)
        shot(page, tmp_path, f"stream-error-{code.lower()}")
        page.unroute(events_url)


def test_phone_sized_run_page_scrolls_the_graph_not_the_page(api: Api, client: Client, browser: Any,
                                                             tmp_path: Path) -> None:
    run = client.start("campaign.build", CAMPAIGN_INPUT).run
    client.wait_status(run.run_id, {"SUCCEEDED", "FAILED"}, 60)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(f"{api.http_url}/runs/{run.run_id}")
        expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(page.locator("#events-state")).to_contain_text("ended")
        overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        assert page.evaluate(overflow) <= 1, "the run page is wider than a phone's screen"
        shot(page, tmp_path, "run-phone")
        page.goto(api.http_url + "/")
        expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible()
        assert page.evaluate(overflow) <= 1, "the runs page is wider than a phone's screen (the table scrolls)"
        shot(page, tmp_path, "runs-phone")
    finally:
        context.close()


def test_with_auth_required_the_page_asks_for_a_key_and_works_after_login(
    database_url: str, browser: Any, tmp_path: Path
) -> None:
    admin_key = "test-admin-dashboard-key-0123456789"
    api = Api(database_url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin_key, RUNS_AUTH_CACHE_SECONDS="0.2")
    try:
        api.start()
        _, client_key = create_key(api.addr, admin_key, "client")
        client = Client(api.addr, api_key=client_key)
        run = client.start("", {}, idempotency_key="dashboard-login").run
        client.close()
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(WAIT_MS)
        try:
            page = context.new_page()
            response = page.goto(f"{api.http_url}/runs/{run.run_id}")
            assert response is not None and response.status == 401
            expect(page.locator("form input[name=key]")).to_be_visible()
            shot(page, tmp_path, "login")
            page.fill("input[name=key]", "runs_not-a-key")
            page.locator("form button[type=submit]").click()
            expect(page.locator(".flash.bad")).to_contain_text("not valid")
            page.fill("input[name=key]", client_key)
            page.locator("form button[type=submit]").click()
            page.wait_for_url(f"**/runs/{run.run_id}")  # back where the login was asked for
            expect(page.locator("#run-status")).to_have_text("queued")
            cookie = next(c for c in context.cookies() if c["name"] == "runs_key")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert not cookie["secure"]  # the API listens on loopback: plain http to it keeps the cookie
            page.goto(f"{api.http_url}/")
            expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible()
            expect(page.locator(".counts")).to_have_count(0)  # GetStats is for admin keys: hidden
            shot(page, tmp_path, "runs-after-login")
            # A cookie-authenticated change without the CSRF header is refused; the page's own cancel works.
            refused = page.request.post(f"{api.http_url}/v1/runs/{run.run_id}/cancel", data="{}",
                                        headers={"Content-Type": "application/json"})
            assert refused.status == 403  # PERMISSION_DENIED
            page.goto(f"{api.http_url}/runs/{run.run_id}")
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("#cancel").click()
            expect(page.locator("#run-status")).to_have_text("canceled")
            page.locator(".who button").click()  # log out (a POST)
            expect(page.locator("form input[name=key]")).to_be_visible()
            wait_until(lambda: not any(c["name"] == "runs_key" for c in context.cookies()), 5, "the cookie cleared")
        finally:
            context.close()
    finally:
        _stop(api)


# --- the server-side layout (pure) ----------------------------------------------------------------


def test_layout_puts_each_graphlib_layer_in_a_column_and_draws_every_dependency() -> None:
    deps = {"brief": [], "copy": ["brief"], "images": ["brief"], "landing_page": ["copy", "images"],
            "bundle": ["landing_page"]}
    assert dag.layers(deps) == [["brief"], ["copy", "images"], ["landing_page"], ["bundle"]]
    graph = dag.layout(deps, status={"brief": "skipped"}, marks={"brief": "reused"})
    at = {n.key: (n.x, n.y) for n in graph.nodes}
    assert at["brief"][0] < at["copy"][0] == at["images"][0] < at["landing_page"][0] < at["bundle"][0]
    assert at["copy"][1] != at["images"][1]
    assert {(e.source, e.target) for e in graph.edges} == {(d, k) for k, ds in deps.items() for d in ds}
    assert all(0 <= n.x and n.x + graph.box_w <= graph.width and n.y + graph.box_h <= graph.height
               for n in graph.nodes)
    assert next(n for n in graph.nodes if n.key == "brief").mark == "reused"
    # A cycle (never in a registered spec) still draws, in one column; unknown dependencies are ignored.
    assert dag.layers({"a": ["b"], "b": ["a"]}) == [["a", "b"]]
    assert dag.layers({"a": ["gone"]}) == [["a"]]


def test_timeline_scales_tries_into_the_span_and_open_tries_end_now() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    chart = dag.timeline([
        ("a", [(at(0), at(2), "failed", "try 1"), (at(2), at(5), "succeeded", "try 2")]),
        ("b", [(at(5), None, "invoked", "try 1")]),
    ], now=at(10))
    assert chart.seconds == 10
    a, b = chart.lanes
    assert [(x.left, x.width) for x in a.bars] == [(0, 20), (20, 30)]
    assert (b.bars[0].left, b.bars[0].width) == (50, 50)
    assert chart.ticks[0] == (0, "0ms") and chart.ticks[-1] == (100, "10s")
    assert dag.timeline([("a", [])], t0).lanes == []
