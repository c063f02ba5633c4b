"""The live dashboard in a real browser (headless Chromium) against a real broker process.

One ``trioq broker --workers 1`` child (TLS broker, HTTP API + dashboard, one supervised
local worker) and one page serve the whole module; the tests run in file order on that
page, which is never reloaded, so everything after the first load arrives live (SSE).

Playwright's sync API cannot run inside Trio's event loop, so these are plain sync tests
(pytest-trio leaves them alone) and the broker is a ``subprocess.Popen`` child whose
stderr is read by a thread: readiness comes from its log lines, never from sleeping.

Every run writes the final screenshot to ``test-artifacts/dashboard.png``; ``TRIOQ_SAVE_SCREENSHOT=1``
also copies it to ``docs/dashboard.png``, the one the README shows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from .procs import BrokerProcess, free_port

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parent.parent
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
WAIT_MS = 15_000  # every browser-side wait is bounded by this


class Dashboard:
    """The page plus everything the module checks about it."""

    def __init__(self, page: Page, broker: BrokerProcess, url: str, token: str, port: int) -> None:
        self.page = page
        self.broker = broker
        self.url = url
        self.token = token
        self.port = port
        self.console_errors: list[str] = []
        self.submit_posts: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.on("request", self._on_request)
        self.api = httpx.Client(base_url=url, timeout=10)

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.console_errors.append(f"console.error: {msg.text} @ {msg.location}")

    def _on_request(self, request) -> None:
        if request.method == "POST" and request.url.endswith("/api/submit"):
            self.submit_posts.append(request.post_data or "")

    def by_id(self, testid: str):
        return self.page.get_by_test_id(testid)

    def job_row(self, job_id: str):
        return self.page.locator(f'#job-log-body tr[data-job-id="{job_id}"]')

    def stat(self, key: str) -> float:
        raw = self.by_id(f"stat-{key}").get_attribute("data-value")
        assert raw not in (None, ""), f"stat-{key} has no value"
        return float(raw)

    def stored_token(self) -> str | None:
        return self.page.evaluate("() => localStorage.getItem('trioq-token')")

    def ensure_token(self) -> None:
        """Set the token through the dialog unless the page has one (tests run alone)."""
        if self.stored_token():
            return
        self.by_id("token-button").click()
        self.save_token_in_dialog()

    def save_token_in_dialog(self) -> None:
        expect(self.by_id("token-dialog")).to_be_visible(timeout=WAIT_MS)
        self.by_id("token-input").fill(self.token)
        self.by_id("token-save").click()
        expect(self.by_id("token-dialog")).to_be_hidden(timeout=WAIT_MS)

    def fill_form(self, task: str, payload: str, priority: int) -> None:
        self.by_id("submit-task").fill(task)
        self.by_id("submit-payload").fill(payload)
        self.by_id("submit-priority").fill(str(priority))

    def submitted_id(self, previous: str | None = None) -> str:
        """The job id the form reports for the submit just made."""
        result = self.by_id("submit-result")
        expect(result).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
        not_previous = f"(?!{previous}$)" if previous else ""
        expect(result).to_have_attribute(
            "data-job-id", re.compile(f"^{not_previous}[0-9a-f]{{16}}$"), timeout=WAIT_MS
        )
        job_id = result.get_attribute("data-job-id")
        assert job_id and JOB_ID.match(job_id) and job_id != previous
        expect(result).to_contain_text(job_id)
        return job_id

    def open_detail(self, job_id: str) -> None:
        self.job_row(job_id).click()
        detail = self.by_id("job-detail")
        expect(detail).to_be_visible(timeout=WAIT_MS)
        expect(detail).to_have_attribute("data-job-id", job_id)
        expect(self.by_id("detail-id")).to_have_text(job_id)

    def close_detail(self) -> None:
        self.by_id("job-detail-close").click()
        expect(self.by_id("job-detail")).to_be_hidden(timeout=WAIT_MS)

    def api_job(self, job_id: str) -> dict:
        r = self.api.get(f"/api/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, int, int]]:
    cwd = tmp_path_factory.mktemp("dashboard")
    port, http_port = free_port(), free_port()
    b = BrokerProcess(
        [
            "broker",
            "--port",
            str(port),
            "--http-port",
            str(http_port),
            "--db",
            str(cwd / "q.db"),
            "--certs-dir",
            str(cwd / "certs"),
            "--workers",
            "1",
            "--concurrency",
            "4",
            "--heartbeat-interval",
            "0.5",
            "--heartbeat-timeout",
            "5",
        ],
        cwd,
    )
    try:
        b.wait_for(rf"broker listening on 127\.0\.0\.1:{port} \(TLS on")
        b.wait_for(rf"HTTP API and dashboard on http://127\.0\.0\.1:{http_port}")
        b.wait_for(r"worker local-1 joined .*concurrency 4")
        yield b, port, http_port
    finally:
        b.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard browser test needs Debian's chromium "
            "(CI installs it through .ci/run; locally: apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def dash(browser: Browser, broker: tuple[BrokerProcess, int, int]) -> Iterator[Dashboard]:
    proc, port, http_port = broker
    token = (proc.cwd / "certs" / "http-token").read_text().strip()
    url = f"http://127.0.0.1:{http_port}"
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    context.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    page = context.new_page()
    d = Dashboard(page, proc, url, token, port)
    try:
        page.goto(url + "/", wait_until="load")
        # a marker that a reload would lose: every later check is made on this same page
        page.evaluate("() => { window.__trioqTestLoaded = true; }")
        yield d
    finally:
        d.api.close()
        context.close()


def assert_same_page(d: Dashboard) -> None:
    assert d.page.evaluate("() => window.__trioqTestLoaded === true"), "the page was reloaded"


# --------------------------------------------------------------------------------------------


def test_page_is_live_over_tls_with_the_security_details(dash: Dashboard) -> None:
    d = dash
    expect(d.page).to_have_title(re.compile("trioq"))
    conn = d.by_id("conn-status")
    expect(conn).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    expect(conn).to_contain_text("Live")

    badge = d.by_id("tls-badge")
    expect(badge).to_have_attribute("data-tls", "true", timeout=WAIT_MS)
    expect(badge).to_have_text(re.compile(r"^TLS\s*v?1\.3$"))

    sec = d.by_id("security-panel")

    def field(name: str):
        return sec.locator(f'dd[data-field="{name}"]')

    expect(field("tls_version")).to_contain_text("TLSv1.3", timeout=WAIT_MS)
    expect(field("port")).to_have_text(str(d.port))
    cert = x509.load_pem_x509_certificate((d.broker.cwd / "certs" / "server.pem").read_bytes())
    subject = cert.subject.rfc4514_string()
    assert subject.startswith("CN=")
    expect(field("subject")).to_have_text(subject)
    expires = cert.not_valid_after_utc
    days = (expires - dt.datetime.now(dt.UTC)).days
    expect(field("not_after")).to_contain_text(expires.strftime("%Y-%m-%d"))
    expect(field("not_after")).to_contain_text(re.compile(rf"in ({days - 1}|{days}) days"))
    expect(field("sans")).to_contain_text("127.0.0.1")
    http_port = d.url.rsplit(":", 1)[1]
    expect(field("http")).to_have_text(f"HTTP on port {http_port}")

    # the stat cards are filled from /api/stats and the stats stream
    for key in ("queue_size", "workers", "completed", "total"):
        expect(d.by_id(f"stat-{key}")).to_have_attribute("data-value", re.compile(r"^\d+(\.\d+)?$"))
    assert_same_page(d)


def test_the_supervised_worker_is_listed(dash: Dashboard) -> None:
    d = dash
    workers = d.api.get("/api/workers").json()["workers"]
    assert len(workers) == 1, workers
    w = workers[0]
    rows = d.by_id("workers-table").locator("tbody tr[data-worker-id]")
    expect(rows).to_have_count(1, timeout=WAIT_MS)
    row = rows.first
    expect(row).to_have_attribute("data-worker-id", w["id"])
    cells = row.locator("td")
    expect(cells.nth(0)).to_contain_text("local-1")
    expect(cells.nth(0)).to_contain_text(w["address"])
    expect(row.get_by_test_id("worker-status")).to_have_text(re.compile(r"idle|busy"))
    expect(cells.nth(3)).to_have_text(re.compile(r"^\d+/4$"))  # current jobs / concurrency
    for task in ("reverse_string", "slow_task", "fibonacci"):
        expect(cells.nth(4)).to_contain_text(task)
    expect(d.by_id("stat-workers")).to_have_attribute("data-value", "1", timeout=WAIT_MS)


def test_submit_from_the_form_asks_for_the_token_and_completes_live(dash: Dashboard) -> None:
    d = dash
    assert d.stored_token() is None, "a token was stored before the first mutation"
    d.fill_form("reverse_string", '{"data": "hello"}', 1)
    d.by_id("submit-button").click()

    # the first mutation asks for the token; saving it lets the submit go on
    expect(d.by_id("token-dialog")).to_be_visible(timeout=WAIT_MS)
    assert d.submit_posts == [], "submitted before a token was given"
    d.save_token_in_dialog()
    assert d.stored_token() == d.token
    expect(d.by_id("token-button")).to_have_text("Token set")

    job_id = d.submitted_id()
    assert len(d.submit_posts) == 1
    assert json.loads(d.submit_posts[0]) == {
        "task": "reverse_string",
        "priority": 1,
        "queue": "default",
        "payload": {"data": "hello"},
    }

    row = d.job_row(job_id)
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row).to_have_attribute("data-state", "completed", timeout=WAIT_MS)
    expect(row.locator("td.c-task")).to_have_text("reverse_string")
    expect(row.locator("td.c-pri")).to_have_text("P1")
    expect(row.locator("td.c-result")).to_have_text("olleh")

    d.open_detail(job_id)
    expect(d.by_id("job-detail")).to_have_attribute("data-state", "completed")
    expect(d.by_id("detail-result")).to_have_text('"olleh"', timeout=WAIT_MS)
    expect(d.by_id("detail-payload")).to_contain_text('"data": "hello"')
    expect(d.by_id("cancel-button")).to_be_disabled()
    expect(d.by_id("retry-button")).to_be_enabled()
    d.close_detail()

    job = d.api_job(job_id)
    assert job["state"] == "completed" and job["result"] == "olleh" and job["priority"] == 1
    assert_same_page(d)


def test_an_answer_that_comes_after_the_stream_does_not_turn_a_finished_job_back(dash: Dashboard) -> None:
    """The submit's answer (the job as stored, not finished yet) is held until the stream has
    shown the job completed: the row stays completed (it went back to running once in CI)."""
    d = dash
    d.ensure_token()
    held: list = []
    d.page.route("**/api/submit", lambda route: held.append((route, route.fetch())))
    try:
        d.fill_form("reverse_string", '{"data": "late"}', 1)
        d.by_id("submit-button").click()
        deadline = time.monotonic() + WAIT_MS / 1000
        while not held:  # the handler runs as the page's events are processed
            assert time.monotonic() < deadline, "the submit never reached the route"
            d.page.wait_for_timeout(20)
        route, answer = held[0]
        job_id = answer.json()["id"]
        assert answer.json()["job"]["state"] in ("queued", "running")
        row = d.job_row(job_id)
        expect(row).to_have_attribute("data-state", "completed", timeout=WAIT_MS)  # from the stream
        route.fulfill(response=answer)
    finally:
        d.page.unroute("**/api/submit")
    expect(d.by_id("submit-result")).to_have_attribute("data-job-id", job_id, timeout=WAIT_MS)
    # A later job's row shows once the page has applied what was queued before it: the answer too.
    r = d.api.post("/api/submit", json={"task": "to_uppercase", "payload": {"data": "x"}},
                   headers={"Authorization": f"Bearer {d.token}"})
    assert r.status_code == 201, r.text
    expect(d.job_row(r.json()["id"])).to_be_visible(timeout=WAIT_MS)
    expect(row).to_have_attribute("data-state", "completed")
    assert_same_page(d)


def test_a_job_from_another_client_appears_live_and_moves_the_counters(dash: Dashboard) -> None:
    d = dash
    expect(d.by_id("conn-status")).to_have_attribute("data-state", "live")
    expect(d.by_id("stat-completed")).to_have_attribute("data-value", re.compile(r"^\d+$"))
    completed_before = d.stat("completed")
    total_before = d.stat("total")

    # the trioq CLI over the TLS broker protocol: no HTTP, no page involved
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "trioq",
            "submit",
            "to_uppercase",
            "--payload",
            '{"data": "from the cli"}',
            "--priority",
            "3",
            "--broker",
            f"127.0.0.1:{d.port}",
            "--certs-dir",
            str(d.broker.cwd / "certs"),
        ],
        cwd=d.broker.cwd,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert JOB_ID.match(job_id), r.stdout

    row = d.job_row(job_id)
    expect(row).to_have_attribute("data-state", "completed", timeout=WAIT_MS)
    expect(row.locator("td.c-task")).to_have_text("to_uppercase")
    expect(row.locator("td.c-result")).to_have_text("FROM THE CLI")
    expect(row.locator("td.c-worker")).to_have_text("local-1")
    # newest first
    expect(d.page.locator("#job-log-body tr[data-job-id]").first).to_have_attribute(
        "data-job-id", job_id
    )

    d.page.wait_for_function(
        """([before, total]) => {
            const v = (k) => parseFloat(document.querySelector('[data-testid="stat-' + k + '"]').dataset.value);
            return v('completed') > before && v('total') > total;
        }""",
        arg=[completed_before, total_before],
        timeout=WAIT_MS,
    )
    assert d.stat("completed") >= completed_before + 1
    legend = d.by_id("status-count-completed")
    expect(legend).to_have_attribute("data-value", str(int(d.stat("completed"))), timeout=WAIT_MS)
    assert_same_page(d)


def test_bad_json_payload_is_reported_and_not_submitted(dash: Dashboard) -> None:
    d = dash
    d.ensure_token()
    posts_before = len(d.submit_posts)
    submitted_before = d.api.get("/api/stats").json()["submitted_total"]

    d.fill_form("reverse_string", "{not json", 1)
    d.by_id("submit-button").click()

    result = d.by_id("submit-result")
    expect(result).to_have_attribute("data-state", "err", timeout=WAIT_MS)
    expect(result).to_contain_text("Payload: Invalid JSON")
    expect(result).not_to_have_attribute("data-job-id", re.compile("."))
    expect(d.by_id("payload-error")).to_contain_text("Invalid JSON")
    expect(d.by_id("payload-error")).to_be_visible()
    expect(d.by_id("submit-payload")).to_have_attribute("aria-invalid", "true")
    expect(d.by_id("token-dialog")).to_be_hidden()

    assert len(d.submit_posts) == posts_before, "the bad payload was sent"
    assert d.api.get("/api/stats").json()["submitted_total"] == submitted_before

    # fixing it clears the message
    d.by_id("submit-payload").fill('{"data": "ok"}')
    expect(d.by_id("payload-error")).to_have_text("", timeout=WAIT_MS)
    expect(d.by_id("submit-payload")).to_have_attribute("aria-invalid", "false")


def test_cancel_a_running_job_from_its_detail(dash: Dashboard) -> None:
    d = dash
    d.ensure_token()
    previous = d.by_id("submit-result").get_attribute("data-job-id")
    d.fill_form("slow_task", '{"seconds": 30}', 2)
    d.by_id("submit-button").click()
    job_id = d.submitted_id(previous)

    row = d.job_row(job_id)
    expect(row).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    # the workers table follows live too: the job is on local-1, which is busy
    worker = d.by_id("workers-table").locator("tbody tr[data-worker-id]")
    expect(worker.locator(f'[data-job-link="{job_id}"]')).to_have_text(job_id[:8], timeout=WAIT_MS)
    expect(worker.get_by_test_id("worker-status")).to_have_text("busy")
    expect(worker.locator("td").nth(3)).to_have_text("1/4")
    expect(row.locator("td.c-worker")).to_have_text("local-1")
    d.open_detail(job_id)
    detail = d.by_id("job-detail")
    expect(detail).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    cancel = d.by_id("cancel-button")
    expect(cancel).to_be_enabled()
    cancel.click()

    expect(detail).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)
    expect(row).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)
    expect(cancel).to_be_disabled()
    expect(d.by_id("retry-button")).to_be_enabled()
    expect(d.by_id("toasts")).to_contain_text(f"Cancelled job {job_id[:8]}")
    d.close_detail()

    assert d.api_job(job_id)["state"] == "cancelled"
    # the worker let go of it, live: nothing left running there
    expect(worker.locator("td").nth(3)).to_have_text("0/4", timeout=WAIT_MS)
    expect(worker.get_by_test_id("worker-status")).to_have_text("idle")
    expect(worker.locator(f'[data-job-link="{job_id}"]')).to_have_count(0)
    assert_same_page(d)


def test_no_console_errors_and_a_screenshot(dash: Dashboard, tmp_path: Path) -> None:
    d = dash
    # a little more history for the charts and the log, from the API like any client
    headers = {"Authorization": f"Bearer {d.token}"}
    jobs = [
        ("fibonacci", {"n": 30}, 4),
        ("is_prime", {"n": 7919}, 5),
        ("to_uppercase", {"data": "trio"}, 6),
        ("reverse_string", {"data": "dashboard"}, 2),
        ("fibonacci", {"n": -1}, 5),
        ("slow_task", {"seconds": 20}, 7),
    ]
    ids = []
    for task, payload, priority in jobs:
        body = {"task": task, "payload": payload, "priority": priority}
        if payload == {"n": -1}:
            body["max_attempts"] = 1
        r = d.api.post("/api/submit", json=body, headers=headers)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for job_id in ids[:4]:
        expect(d.job_row(job_id)).to_have_attribute("data-state", "completed", timeout=WAIT_MS)
    expect(d.job_row(ids[4])).to_have_attribute("data-state", "dead", timeout=WAIT_MS)
    expect(d.job_row(ids[5])).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    expect(d.by_id("stat-failed")).to_have_attribute("data-value", "1", timeout=WAIT_MS)

    # the charts are drawn from live data
    expect(d.by_id("status-chart").locator("svg circle[data-state]")).not_to_have_count(0)
    tasks = {"reverse_string", "to_uppercase", "slow_task", "fibonacci", "is_prime"}
    bars = d.by_id("task-chart").locator("svg g[data-task]")
    expect(bars).to_have_count(len(tasks), timeout=WAIT_MS)
    assert {bars.nth(i).get_attribute("data-task") for i in range(len(tasks))} == tasks
    d.by_id("range-1m").click()
    expect(d.by_id("range-1m")).to_have_class(re.compile(r"\bactive\b"))
    chart = d.by_id("throughput-chart")
    # the 1-minute range labels its ticks with seconds
    expect(
        chart.locator("svg text.svg-label").filter(has_text=re.compile(r"^\d\d:\d\d:\d\d$")).first
    ).to_be_visible()
    expect(chart.locator('svg path[data-series="completed"]')).to_have_attribute(
        "d", re.compile(r"^M[\d.]+ [\d.]+L")
    )
    d.page.wait_for_function(
        "() => +document.querySelector('#throughput-chart svg').getAttribute('data-points') >= 3",
        timeout=WAIT_MS,
    )
    expect(d.by_id("queues-panel").locator('tr[data-queue="default"]')).to_be_visible()
    # the worker's counts are live: every completed job so far ran on local-1
    completed = int(d.stat("completed"))
    expect(d.by_id("workers-table").locator("tbody tr[data-worker-id] td").nth(1)).to_contain_text(
        re.compile(rf"(?<!\d){completed} done · 1 failed"), timeout=WAIT_MS
    )
    expect(d.by_id("conn-status")).to_have_attribute("data-state", "live")
    assert_same_page(d)

    d.page.evaluate("() => window.scrollTo(0, 0)")  # the top bar is sticky
    # every run leaves its screenshot in test-artifacts/ (git-ignored), for CI and for people
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "dashboard.png"
    d.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("TRIOQ_SAVE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "dashboard.png").write_bytes(shot.read_bytes())

    # the slow job would hold the worker's shutdown
    r = d.api.post(f"/api/jobs/{ids[5]}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    expect(d.job_row(ids[5])).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)

    assert d.console_errors == [], "errors in the page:\n" + "\n".join(d.console_errors)
    assert d.page.locator('[data-testid="panel-error"]').count() == 0
    assert d.page.locator('[data-testid="toast"].err').count() == 0


def test_a_restart_shows_loading_journal_while_it_serves_and_hides_it_once_loaded(
    browser: Browser, tmp_path: Path
) -> None:
    """A broker of its own, restarted on a journal of 30,000 queued jobs read one job a step
    (--restore-chunk 1: seconds of loading): the page, served meanwhile, says so, then stops."""
    from trioq.job import Job
    from trioq.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "q.db")
    rec = store.open_sync()
    jobs = [Job(rec.job_ids.make(seq, 1)[0], seq, "noop", {}, 5, "default", created_at=1.0)
            for seq in range(rec.next_seq, rec.next_seq + 30_000)]
    store.commit_sync([store.insert_row(j) for j in jobs], [])
    store.close_sync()
    port, http_port = free_port(), free_port()
    b = BrokerProcess(
        ["broker", "--port", str(port), "--http-port", str(http_port), "--db", str(tmp_path / "q.db"),
         "--certs-dir", str(tmp_path / "certs"), "--restore-chunk", "1"],
        tmp_path,
    )
    context = browser.new_context()
    try:
        b.wait_for(rf"HTTP API and dashboard on http://127\.0\.0\.1:{http_port}")
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/", wait_until="load")
        badge = page.get_by_test_id("restore-badge")
        expect(badge).to_be_visible(timeout=WAIT_MS)
        expect(badge).to_have_attribute("title", re.compile(r"unfinished jobs of the journal are not loaded yet"))
        b.wait_for(r"30000 unfinished job\(s\) restored in .* while serving", within=120)
        expect(badge).to_be_hidden(timeout=WAIT_MS)
        expect(page.get_by_test_id("stat-queue_size")).to_have_attribute("data-value", "30000", timeout=WAIT_MS)
    finally:
        context.close()
        b.stop()


def test_a_shutdown_shows_stopping_and_the_broker_exits_by_itself(dash: Dashboard) -> None:
    """Last in the module: it stops the shared broker (SIGTERM to it alone, its worker keeps
    the job), and the page, still served during the grace, says so."""
    d = dash
    headers = {"Authorization": f"Bearer {d.token}"}
    r = d.api.post("/api/submit", json={"task": "slow_task", "payload": {"seconds": 60}}, headers=headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    expect(d.job_row(job_id)).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    expect(d.by_id("stop-badge")).to_be_hidden()
    d.broker.proc.send_signal(signal.SIGTERM)
    expect(d.by_id("stop-badge")).to_be_visible(timeout=WAIT_MS)
    assert d.broker.proc.wait(60) == 0
    d.broker.wait_for(rf"shutting down: \d+ job\(s\) still running after 10s handed back to their queues: .*{job_id}")
    assert_same_page(d)
