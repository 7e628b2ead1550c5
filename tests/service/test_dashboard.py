"""The dashboard (GET /dashboard): its files ship in the package, and in a real headless Chromium
the page logs in with a key, shows every number of ``GET /stats`` by the documented rule, draws
its charts, refreshes by itself, logs no console error and sends no request off its origin.

The browser is Debian's ``chromium`` driven over the Chrome DevTools Protocol (a websocket:
the ``websockets`` package uvicorn[standard] brings), so no WebDriver is needed. Without a
Chromium binary the browser tests skip.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.resources
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from mqsa.errors import ServiceError
from mqsa.service import app as app_module
from mqsa.service.app import create_app
from mqsa.service.deps import requires
from mqsa.service.keys import Scope, entry
from mqsa.service.routes import dashboard
from mqsa.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
READ_KEY, WRITE_KEY = "r" * 24, "w" * 24
KEYS = ",".join((entry(READ_KEY, ["read"]), entry(WRITE_KEY, ["write"])))
DASH = "\u2013"

# ---- the number rule of service/static/dashboard/dashboard.js ------------------------------------
# JavaScript's toFixed rounds the double's exact value half away from zero; so does this.


def fixed(x: float, places: int) -> str:
    return str(Decimal(x).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def count(n: int | None) -> str:
    return DASH if n is None else f"{round(n):,}"


def rate(x: float | None) -> str:
    return DASH if x is None else fixed(x * 100, 2) + "%"


def ms(x: float | None) -> str:
    return DASH if x is None else fixed(x, 2) + " ms"


def metric(x: Any) -> str:
    if isinstance(x, int | float) and not isinstance(x, bool):
        return count(int(x)) if float(x).is_integer() else fixed(x, 4)
    return DASH if x is None else x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))


def flatten(value: dict | None, prefix: str = "") -> dict[str, Any]:
    """The offline metrics as the page lists them: nested names joined by dots."""
    out: dict[str, Any] = {}
    for key, v in (value or {}).items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def model_numbers(m: dict) -> dict[str, str]:
    """What one model's tile shows, by data-testid."""
    mid = f"{m['model_version']}-{m['mode']}"
    latency = m.get("latency_ms") or {}
    fallbacks = m.get("fallbacks") or {}
    shown = {
        "role": m.get("role") or "not loaded",
        **{f: count(m.get(k)) for f, k in (("impressions",) * 2, ("clicks",) * 2, ("hits",) * 2)},
        "conversions": count(m.get("conversions")),
        "ctr": rate(m.get("ctr")),
        "hit-rate": rate(m.get("hit_rate")),
        "conversion-rate": rate(m.get("conversion_rate")),
        "coverage": rate(m.get("coverage")),
        "distinct-items": count(m.get("distinct_items")),
        "num-items": count(m.get("num_items")),
        **{p: ms(latency.get(p)) for p in ("p50", "p95", "p99")},
        "fallbacks": count(sum(fallbacks.values())),
        **{f"fallback-{reason}": count(n) for reason, n in fallbacks.items()},
        **{f"offline-{name}": metric(v) for name, v in flatten(m.get("offline_metrics")).items()},
    }
    return {f"{field}-{mid}": text for field, text in shown.items()}


def expected_numbers(stats: dict) -> dict[str, str]:
    """Every number the page shows for this /stats answer, by data-testid, as text."""
    out = {
        "window-minutes": count(stats["window"]["minutes"]),
        "attribution-window": count(stats["attribution_window_seconds"]),
        **{f"events-{t}": count(n) for t, n in (stats.get("events") or {}).items()},
    }
    traffic = stats.get("traffic")
    if traffic:
        out["champion"] = traffic.get("champion") or DASH
        out.update({f"share-{v}": rate(s) for v, s in (traffic.get("shares") or {}).items()})
        shadows = [s if isinstance(s, str) else s["model_version"] for s in traffic.get("shadow") or []]
        out.update({f"shadow-{v}": v for v in shadows})
    for m in stats["models"]:
        out.update(model_numbers(m))
    return out


NOT_NUMBERS = ("tile-", "chart-", "updated", "message")  # data-testids that carry no number


def assert_page_shows(shown: list[list[str]], stats: dict) -> None:
    texts = dict(shown)
    assert len(texts) == len(shown), "a data-testid is used twice"
    expected = expected_numbers(stats)
    assert {k: texts.get(k) for k in expected} == expected
    unchecked = {k for k in texts if k not in expected and not k.startswith(NOT_NUMBERS)}
    assert unchecked == set(), "the page shows numbers the test does not know"
    tiles = {k for k in texts if k.startswith("tile-")}
    assert tiles == {f"tile-{m['model_version']}-{m['mode']}" for m in stats["models"]}


def test_the_rule_rounds_as_javascript_does() -> None:
    # (0.125).toFixed(2) is "0.13" in JavaScript; Python's own format would say "0.12"
    assert rate(0.00125) == "0.13%" and ms(2.125) == "2.13 ms" and rate(1 / 3) == "33.33%"
    assert count(12101) == "12,101" and count(None) == DASH and metric(0.08) == "0.0800"
    assert metric(12) == metric(12.0) == "12" and metric([1, 2]) == "[1,2]" and metric(True) == "true"


# ---- the files ship in the package ------------------------------------------------------------


def test_the_dashboard_files_are_package_data() -> None:
    """Found through importlib.resources (as installed), and named by pyproject's package-data."""
    root = importlib.resources.files(dashboard.STATIC_PACKAGE)
    for path, _ in [dashboard.PAGE, *dashboard.ASSETS.values()]:
        assert dashboard.asset(path), path
        assert root.joinpath(*f"{dashboard.STATIC_DIR}/{path}".split("/")).is_file(), path
    assert b"uPlot (v1.6.32)" in dashboard.asset("vendor/uplot/uPlot.iife.min.js")[:100]
    assert b"MIT License" in dashboard.asset("vendor/uplot/LICENSE")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    service_dir = ROOT / config["package-dir"]["mqsa.service"]
    files = [p for p in (service_dir / "static").rglob("*") if p.is_file()]
    assert len(files) >= len(dashboard.ASSETS) + 1
    for path in files:  # each file's folder is a listed package whose package-data names the file
        package = ".".join(("mqsa.service", *path.parent.relative_to(service_dir).parts))
        assert package in config["packages"], path
        assert any(fnmatch.fnmatch(path.name, g) for g in config["package-data"][package]), path


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.links: list[str] = []
        self.inline: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.inline += [name for name in a if name == "style" or name.startswith("on")]
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            self.scripts.append(a)
            self.in_script = True
        if tag == "link":
            self.links.append(a["href"] or "")

    def handle_endtag(self, tag: str) -> None:
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline.append("inline script")


@pytest.fixture
def plain_client(tmp_path) -> TestClient:
    """The app without its lifespan (no bundle, no Redis): enough for static pages."""
    return TestClient(create_app(Settings(bundle_dir=tmp_path, api_keys=KEYS)))


def test_the_page_is_open_with_a_strict_policy_and_no_inline_code(plain_client) -> None:
    r = plain_client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "http" not in policy and "unsafe" not in policy and "*" not in policy
    page = PageParser()
    page.feed(r.text)
    assert page.inline == []
    sources = [s["src"] for s in page.scripts] + page.links
    # relative addresses: the page also works behind a path prefix
    assert sources and all(s.startswith("dashboard/static/") for s in sources)
    for source in sources:
        asset = plain_client.get("/" + source)
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == policy, source
        assert asset.headers["x-content-type-options"] == "nosniff"
    script = plain_client.get("/dashboard/static/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")


def test_only_the_listed_files_are_served(plain_client) -> None:
    for name in ("index.html", "LICENSE", "..%2F..%2Fapp.py", "vendor%2Fuplot%2FLICENSE", "nope.js"):
        r = plain_client.get(f"/dashboard/static/{name}")
        assert r.status_code == 404 and r.json()["error"] == "not_found", name
    assert plain_client.get("/dashboard/static/../routes/dashboard.py").status_code == 404


# ---- a real headless Chromium over the DevTools protocol ----------------------------------------


def chromium_binary() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


class Browser:
    """One headless Chromium page, driven over the DevTools protocol; it keeps every event it hears."""

    def __init__(self, binary: str, profile: Path) -> None:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"]
        flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        flags += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000"]
        # Debian's launcher is a shell script that does not exec: a session of its own, killed whole.
        self.process = subprocess.Popen(
            [binary, *flags, "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.events: list[dict] = []
        self._id = 0
        try:
            self.ws = self._connect(profile / "DevToolsActivePort")
            for domain in ("Runtime", "Log", "Network", "Page"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _connect(self, port_file: Path) -> Any:
        from websockets.sync.client import connect

        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
        page = next(p for p in pages if p["type"] == "page")
        ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        return ws.__enter__()  # used as a context manager (websockets 17 warns otherwise); closed in close()

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=20))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            time.sleep(0.05)
        return value

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.body.dataset.state !== 'loading'")

    def type_key(self, key: str) -> None:
        """Type the key into the page's field and press Enter, as a user would."""
        self.evaluate("document.getElementById('api-key').focus()")
        self.call("Input.insertText", text=key)
        enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **enter)
        self.call("Input.dispatchKeyEvent", type="keyUp", **enter)

    def text(self, testid: str) -> str | None:
        return self.evaluate(f"document.querySelector('[data-testid=\"{testid}\"]')?.textContent")

    def shown(self) -> list[list[str]]:
        js = "[...document.querySelectorAll('[data-testid]')].map(e => [e.dataset.testid, e.textContent])"
        return self.evaluate(js)

    def problems(self) -> list[tuple[str, str]]:
        """Console errors and warnings, uncaught exceptions, and the browser's own error log."""
        out = []
        for event in self.events:
            method, p = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append(("exception", details.get("exception", {}).get("description") or details["text"]))
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert", "warning"):
                text = " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                out.append(("console", text))
            elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append((p["entry"]["source"], f"{p['entry']['text']} {p['entry'].get('url', '')}"))
        return out

    def requested(self) -> list[str]:
        sent = [e for e in self.events if e["method"] == "Network.requestWillBeSent"]
        return [e["params"]["request"]["url"] for e in sent]

    def stats_answers(self) -> list[tuple[int, dict]]:
        """(status, body) of every /stats answer the page received, in order."""
        out = []
        answers = [e["params"] for e in self.events if e["method"] == "Network.responseReceived"]
        for answer in answers:
            if "/stats?" in answer["response"]["url"]:
                body = self.call("Network.getResponseBody", requestId=answer["requestId"])["body"]
                out.append((answer["response"]["status"], json.loads(body)))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def fresh(browser) -> Browser:
    """The browser on an empty tab, no events kept. (Each test serves on a port of its own, so an
    origin of its own: no key stored.)"""
    browser.call("Page.navigate", url="about:blank")
    browser.events.clear()
    return browser


class Served:
    """An ASGI app served by uvicorn on a free port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def assert_clean(browser: Browser, origin: str, allowed: Callable[[tuple[str, str]], bool] = lambda p: False):
    assert [p for p in browser.problems() if not allowed(p)] == []
    requested = browser.requested()
    assert requested and all(url.startswith(origin + "/") for url in requested), requested


def refused(problem: tuple[str, str]) -> bool:
    """The browser's own line for a /stats answer of 401 or 403 (expected before the key is right)."""
    source, text = problem
    return source == "network" and "/stats?" in text and ("401" in text or "403" in text)


# ---- the page against a /stats answer with every case in it --------------------------------------

A, B, C, OLD = "3f9a0c1d2b4e5f60", "aa01bb02cc03dd04", "5e5e5e5e5e5e5e5e", "0123456789abcdef"


def sample_stats(minutes: int) -> dict:
    """A /stats answer as docs/feedback.md shapes it: a champion, a challenger, a shadow model with
    no traffic (null rates and latencies), a version no longer loaded; counts past a thousand and
    rates on a rounding tie."""
    until = float(int(time.time()) // 60 * 60)
    since = until - 60 * minutes
    series = [
        {"minute": int(since) + 60 * i, "impressions": i % 7, "attributable": i % 7, "clicks": i % 2,
         "hits": min(i % 3, i % 7),
         "conversions": i % 11 == 0, "p99_ms": 2.0 + (i % 5) / 10}
        for i in range(minutes)
    ]  # fmt: skip
    none = {"impressions": 0, "attributable": 0, "clicks": 0, "hits": 0, "conversions": 0, "p99_ms": None}
    zeros = [{**p, **none} for p in series]
    common = {"distinct_items": 410, "num_items": 12101, "series": series}
    return {
        "window": {"minutes": minutes, "since": since, "until": until},
        "attribution_window_seconds": 1800,
        "models": [
            {"model_version": A, "mode": "served", "role": "champion", "impressions": 12101, "clicks": 907,
             "hits": 3100, "conversions": 2, "ctr": 0.075, "hit_rate": 0.2583, "conversion_rate": 0.00125,
             "coverage": 0.0339, "latency_ms": {"p50": 1.1, "p95": 2.0, "p99": 2.125},
             "fallbacks": {"no_usable_history": 4, "redis_down": 1000},
             "offline_metrics": {"epoch": 12, "valid": {"NDCG@20": 0.08, "HR@20": 0.123456}, "note": "x",
                                 "test": {"NDCG@20": 1.0, "HR@20": 0.00125, "per_k": [1, 2]}}, **common},
            {"model_version": B, "mode": "served", "role": "challenger", "impressions": 1344, "clicks": 100,
             "hits": 0, "conversions": 0, "ctr": 100 / 1344, "hit_rate": 0.0, "conversion_rate": 0.0,
             "coverage": 1.0, "latency_ms": {"p50": 0.9, "p95": 1.75, "p99": 3.0}, "fallbacks": {},
             "offline_metrics": {"NDCG@20": 0.0815}, **common},
            {"model_version": C, "mode": "shadow", "role": "challenger", "impressions": 0, "clicks": 0,
             "hits": 0, "conversions": 0, "ctr": None, "hit_rate": None, "conversion_rate": None,
             "distinct_items": 0, "num_items": 12101, "coverage": 0.0,
             "latency_ms": {"p50": None, "p95": None, "p99": None}, "fallbacks": {}, "offline_metrics": {},
             "series": zeros},
            {"model_version": OLD, "mode": "served", "role": None, "impressions": 3, "clicks": 1, "hits": 1,
             "conversions": 0, "ctr": 1 / 3, "hit_rate": 1 / 3, "conversion_rate": 0.0, "coverage": 0.0002,
             "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0}, "fallbacks": {}, "offline_metrics": {},
             **common},
        ],
        "events": {"view": 300, "click": 1008, "add_to_cart": 0, "purchase": 2},
        "traffic": {"champion": A, "shares": {A: 0.9, B: 0.1}, "shadow": [C]},
    }  # fmt: skip


def stub_app(tmp_path: Path) -> FastAPI:
    """The dashboard's router and a /stats answering ``sample_stats`` behind the real key check."""
    app = FastAPI()
    app.state.settings = Settings(bundle_dir=tmp_path, api_keys=KEYS)
    app.add_exception_handler(ServiceError, app_module._service_error)
    app.include_router(dashboard.router)

    @app.get("/stats", dependencies=[Depends(requires(Scope.READ))])
    async def stats(minutes: int = 60) -> dict:
        return sample_stats(minutes)

    return app


def test_the_page_logs_in_shows_every_number_and_refreshes(fresh, tmp_path) -> None:
    with Served(stub_app(tmp_path)) as served:
        fresh.open(f"{served.url}/dashboard?minutes=30&refresh=1")
        assert fresh.evaluate("document.body.dataset.state") == "unauthorized"
        assert "API key" in fresh.evaluate("document.getElementById('message').textContent")
        assert fresh.evaluate("document.getElementById('content').hidden") is True
        fresh.type_key(WRITE_KEY)
        fresh.wait_for("document.body.dataset.state === 'forbidden'")
        assert "read scope" in fresh.evaluate("document.getElementById('message').textContent")
        fresh.type_key(READ_KEY)
        fresh.wait_for("Number(document.body.dataset.updates) >= 2", timeout=15)  # refreshed by itself
        assert fresh.evaluate("document.getElementById('updated').textContent").startswith("Updated ")
        assert_clean(fresh, served.url, allowed=refused)

        fresh.events.clear()
        fresh.open(f"{served.url}/dashboard?minutes=30&refresh=0")  # the key is kept in the tab
        fresh.wait_for("document.body.dataset.state === 'ok'")
        time.sleep(0.3)  # nothing more is read with refresh off
        ((status, stats),) = fresh.stats_answers()
        assert status == 200 and stats["window"]["minutes"] == 30
        assert_page_shows(fresh.shown(), stats)
        assert fresh.evaluate("document.getElementById('window').value") == "30"  # a window not in the list
        assert fresh.evaluate("document.getElementById('message').hidden") is True
        assert fresh.evaluate("document.querySelectorAll('#charts .uplot canvas').length") == 4
        legend = "[...document.querySelectorAll('#chart-ctr .u-legend th')].map(e => e.textContent.trim())"
        models = ((A, "served"), (B, "served"), (C, "shadow"), (OLD, "served"))
        assert fresh.evaluate(legend)[1:] == [f"{v[:8]} {m}" for v, m in models]
        assert_clean(fresh, served.url)

        fresh.evaluate("document.getElementById('forget-key').click()")
        fresh.wait_for("document.body.dataset.state === 'unauthorized'")
        assert fresh.evaluate("document.getElementById('content').hidden && sessionStorage.length === 0")
        assert_clean(fresh, served.url, allowed=refused)


# ---- the page over the real service: real /stats, real Redis, the tiny bundle ---------------------


def make_traffic(client: httpx.Client, vocab: list[str]) -> dict[str, int]:
    """Six lists (one user without history: popular items), three clicks and a purchase carrying
    their list's recommendation id; what the served model's numbers must then be."""
    write = {"X-API-Key": WRITE_KEY}
    for u in range(5):
        events = [{"user_id": f"u{u}", "item_id": i} for i in vocab[10 * u : 10 * u + 4]]
        assert client.post("/events", json={"events": events}, headers=write).status_code == 200
    answers = []
    for u in range(6):
        r = client.post("/recommend", json={"user_id": f"u{u}", "n": 5}, headers={"X-API-Key": READ_KEY})
        assert r.status_code == 200
        answers.append(r.json())
    feedback = [
        {"user_id": f"u{u}", "item_id": answers[u]["items"][0]["item_id"], "event_type": "click",
         "recommendation_id": answers[u]["recommendation_id"]}
        for u in range(3)
    ] + [{"user_id": "u0", "item_id": answers[0]["items"][1]["item_id"], "event_type": "purchase",
          "recommendation_id": answers[0]["recommendation_id"]}]  # fmt: skip
    assert client.post("/events", json={"events": feedback}, headers=write).status_code == 200
    return {"impressions": 6, "clicks": 3, "hits": 3, "conversions": 1}


def test_the_page_shows_the_services_own_stats(fresh, bundle_dir, redis_url, run_prefix) -> None:
    settings = Settings(
        bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=f"{run_prefix}:dashboard", api_keys=KEYS
    )
    vocab = json.loads((bundle_dir / "items.json").read_text())["item_ids"]
    version = json.loads((bundle_dir / "manifest.json").read_text())["model_version"]
    with Served(create_app(settings)) as served, httpx.Client(base_url=served.url, trust_env=False) as client:
        expected = make_traffic(client, vocab)
        direct = client.get("/stats", params={"minutes": 60}, headers={"X-API-Key": READ_KEY})
        assert direct.status_code == 200, direct.text

        fresh.open(f"{served.url}/dashboard?minutes=60&refresh=0")
        assert fresh.evaluate("document.body.dataset.state") == "unauthorized"
        fresh.type_key(READ_KEY)
        fresh.wait_for("document.body.dataset.state === 'ok'")
        (*_, (status, stats)) = fresh.stats_answers()
        assert status == 200
        assert_page_shows(fresh.shown(), stats)
        (model,) = [m for m in stats["models"] if (m["model_version"], m["mode"]) == (version, "served")]
        assert {k: model[k] for k in expected} == expected
        assert model["role"] == "champion" and model["fallbacks"] == {"no_usable_history": 1}
        assert stats["traffic"]["shares"] == {version: 1.0}
        assert fresh.text(f"share-{version}") == "100.00%" and fresh.text(f"ctr-{version}-served") == "50.00%"
        (same,) = [
            m for m in direct.json()["models"] if (m["model_version"], m["mode"]) == (version, "served")
        ]
        assert {k: same[k] for k in expected} == expected
        assert fresh.evaluate("document.querySelectorAll('#charts .uplot canvas').length") == 4
        assert_clean(fresh, served.url, allowed=refused)
