"""The browser face in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) loads pages from a plain HTTP server on another port,
which is another origin than meteorit's. Pages on an allowed origin get their events into
Redis through the snippet (fetch, then a beacon as the page is left), through fetch with a
gzip body from CompressionStream (a CORS preflight first), and through an <img> pixel; a page
on an origin not allowed gets nothing queued. Every wait is on Redis or on meteorit's
counters, never a sleep.

Browsers tell 127.0.0.1 and localhost apart as origins: meteorit is http://127.0.0.1:PORT,
the allowed pages http://localhost:PAGES, the refused ones http://127.0.0.1:PAGES, and
--host-resolver-rules sends *.shop.test to 127.0.0.1 for the subdomain wildcard.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from conftest import Meteorit, RedisServer, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUEUE = "meteorit:events"
PUBLIC = "pk_browser_test"
WAIT = 30.0  # seconds for what a browser does to show in Redis (a busy 2-core machine)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Pages:
    """A plain HTTP server for the test pages, on another port than meteorit's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name: str, html: str) -> str:
        (self.root / name).write_text(html)
        return name

    def url(self, name: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}/{name}"

    def origin(self, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    served = Pages(tmp_path_factory.mktemp("pages"))
    served.add("blank.html", "<!doctype html><title>next</title><p>the page after</p>")
    yield served
    served.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
              pages: Pages) -> Iterator[Meteorit]:
    m = Meteorit(tmp_path_factory.mktemp("collector"), {
        "redis": {"url": redis_server.url},
        "auth": {"keys": ["sk_server_only"], "public_keys": [PUBLIC]},
        "http": {"cors_origins": [pages.origin(), f"http://*.shop.test:{pages.port}"]},
        "events": {"context": ["origin", "user_agent"]},
    })
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver "
                    "(.ci/run does)")
    profile = tempfile.mkdtemp(prefix="meteorit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP *.shop.test 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium: webdriver.Chrome, collector: Meteorit, redis: redislib.Redis) -> webdriver.Chrome:
    return chromium  # `redis` empties the queue before each test


def events(redis: redislib.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis.lrange(QUEUE, 0, -1)]


def wait_for_events(redis: redislib.Redis, n: int, what: str) -> list[dict[str, Any]]:
    wait_until(lambda: redis.llen(QUEUE) >= n, WAIT, what)
    return events(redis)


def totals(m: Meteorit) -> dict[str, Any]:
    return m.ctl_json("stats")["total"]


def snippet_page(m: Meteorit, pages: Pages, name: str) -> str:
    """A page that includes the snippet from meteorit; batches leave only when told (flush)
    or when the page is left (the beacon), never on a timer during a test."""
    return pages.add(name, f"""<!doctype html><meta charset="utf-8"><title>shop</title>
<script src="http://{m.base}/v1/meteorit.js" data-key="{PUBLIC}"></script>
<script>meteorit.init({{flushInterval: 600000, batchSize: 100, maxRetries: 0}});</script>
<p>a page of the shop</p>""")


def test_the_snippet_sends_by_fetch_then_by_beacon_when_the_page_is_left(
        browser: webdriver.Chrome, collector: Meteorit, pages: Pages, redis: redislib.Redis) -> None:
    browser.get(pages.url(snippet_page(collector, pages, "shop.html")))
    assert browser.execute_script("return typeof meteorit.track") == "function"
    browser.execute_script("""
        meteorit.track("pageview", {n: 1, path: location.pathname});
        meteorit.track("click", {n: 2, button: "buy"});
        meteorit.track("click", {n: 3, nested: {a: [1, 2]}});
        meteorit.flush();""")
    fetched = wait_for_events(redis, 3, "the fetched batch in Redis")
    # the 202 reaches the page a moment after Redis has the events
    sent = wait_until(lambda: (lambda s: s if s["sent"] else None)(browser.execute_script("return meteorit.stats()")),
                      10, "the page to see its batch acknowledged")
    assert (sent["sent"], sent["beacons"], sent["queued"], sent["dropped"]) == (3, 0, 0, 0)
    # these two wait in the queue (the timer is 10 minutes away) until the page is left
    browser.execute_script("""meteorit.track("scroll", {n: 4}); meteorit.track("leave", {n: 5});""")
    assert browser.execute_script("return meteorit.stats().queued") == 2
    browser.get(pages.url("blank.html"))  # pagehide: the beacon
    stored = wait_for_events(redis, 5, "the beaconed events in Redis")
    assert len(stored) == 5
    assert [(e["type"], e["n"]) for e in stored] == [
        ("pageview", 1), ("click", 2), ("click", 3), ("scroll", 4), ("leave", 5)]
    assert stored[:3] == fetched
    assert stored[0]["path"] == "/shop.html" and stored[2]["nested"] == {"a": [1, 2]}
    assert len({e["id"] for e in stored}) == 5 and all(isinstance(e["ts"], int) for e in stored)
    for event in stored:
        assert event["context"]["origin"] == pages.origin()  # the browser said where it came from
        assert "Chrome" in event["context"]["user_agent"]
        assert PUBLIC not in json.dumps(event)


def test_the_snippet_never_throws_into_the_page(browser: webdriver.Chrome, collector: Meteorit, pages: Pages,
                                              redis: redislib.Redis) -> None:
    browser.get(pages.url(snippet_page(collector, pages, "odd.html")))
    results = browser.execute_script("""
        const cycle = {}; cycle.self = cycle;
        const calls = [() => meteorit.track(), () => meteorit.track(""), () => meteorit.track(42),
                       () => meteorit.track("cyclic", cycle), () => meteorit.track("big", {n: 10n}),
                       () => meteorit.track("fine", "not an object"), () => meteorit.init(null),
                       () => meteorit.flush()];
        return calls.map(call => { try { return call(); } catch (e) { return "threw " + e; } });""")
    assert results[:6] == [False, False, False, None, None, True]  # refused quietly (None: swallowed)
    browser.execute_script("""meteorit.track("after", {n: 1}); meteorit.flush();""")
    stored = wait_for_events(redis, 2, "the events that could be sent")
    assert [e["type"] for e in stored] == ["fine", "after"]
    browser.get(pages.url("blank.html"))


def test_the_snippet_waits_out_a_429_as_retry_after_says(
        chromium: webdriver.Chrome, meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
        redis: redislib.Redis, pages: Pages) -> None:
    """One worker, so one bucket: 2 events/s with a burst of 3. The first batch of 3 empties
    the bucket, the second gets 429 with Retry-After: 2, which the page can read (exposed by
    CORS), waits, and sends again."""
    m = meteorit_factory({"redis": {"url": redis_server.url}, "server": {"workers": 1},
                          "auth": {"public_keys": [PUBLIC]}, "http": {"cors_origins": [pages.origin()]},
                          "limits": {"key_rate": 2, "key_burst": 3}})
    chromium.get(pages.url(snippet_page(m, pages, "limited.html")))
    chromium.execute_script("""meteorit.init({maxRetries: 5});
        for (let n = 0; n < 3; n++) meteorit.track("first", {n}); meteorit.flush();""")
    wait_for_events(redis, 3, "the first batch")
    chromium.execute_script("""for (let n = 0; n < 3; n++) meteorit.track("second", {n}); meteorit.flush();""")
    wait_until(lambda: chromium.execute_script("return meteorit.stats().retries") >= 1, WAIT, "the 429")
    assert chromium.execute_script("return meteorit.stats().retryAfter") == 2
    stored = wait_for_events(redis, 6, "the second batch, sent again")
    assert [(e["type"], e["n"]) for e in stored] == [("first", n) for n in range(3)] + [("second", n) for n in range(3)]
    assert m.ctl_json("stats")["total"]["requests"]["429"] >= 1
    chromium.get(pages.url("blank.html"))  # leave no timer of this page running


def test_fetch_with_a_gzip_body_and_a_key_header_passes_the_preflight(
        browser: webdriver.Chrome, collector: Meteorit, pages: Pages, redis: redislib.Redis) -> None:
    """Content-Type: application/json, X-Api-Key and Content-Encoding make the browser ask
    first (OPTIONS); the body comes from the browser's own CompressionStream."""
    browser.get(pages.url("blank.html"))
    before = totals(collector)["requests"].get("204", 0)
    status, body, kind = browser.execute_async_script(GZIP_FETCH, f"http://{collector.base}/v1/events", PUBLIC,
                                                      [{"type": "gzipped", "n": n} for n in range(20)])
    assert (status, json.loads(body), kind) == (202, {"accepted": 20}, "cors")  # the page may read it
    assert [e["n"] for e in wait_for_events(redis, 20, "the gzipped batch")] == list(range(20))
    assert totals(collector)["requests"]["204"] >= before + 1  # the preflight


GZIP_FETCH = """
const [url, key, batch, done] = arguments;
(async () => {
  const gzipped = new Blob([JSON.stringify(batch)]).stream().pipeThrough(new CompressionStream("gzip"));
  const response = await fetch(url, {method: "POST", body: await new Response(gzipped).arrayBuffer(),
    headers: {"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Api-Key": key}});
  done([response.status, await response.text(), response.type]);
})().catch(error => done([0, String(error), null]));
"""


def test_a_subdomain_allowed_by_a_wildcard(browser: webdriver.Chrome, collector: Meteorit, pages: Pages,
                                           redis: redislib.Redis) -> None:
    browser.get(pages.url("blank.html", host="www.shop.test"))
    status, body, kind = browser.execute_async_script(GZIP_FETCH, f"http://{collector.base}/v1/events", PUBLIC,
                                                      [{"type": "from-subdomain"}])
    assert (status, body, kind) == (202, '{"accepted":1}', "cors")
    [event] = wait_for_events(redis, 1, "the subdomain's event")
    assert event["context"]["origin"] == pages.origin("www.shop.test")


def test_a_page_on_an_origin_not_allowed_gets_nothing_queued(
        browser: webdriver.Chrome, collector: Meteorit, pages: Pages, redis: redislib.Redis) -> None:
    before = totals(collector)
    forbidden = before["events_rejected"].get("forbidden", 0)
    refused = before.get("cors_refused", 0)
    # 127.0.0.1:PAGES is not localhost:PAGES: not in http.cors_origins
    browser.get(pages.url(snippet_page(collector, pages, "elsewhere.html"), host="127.0.0.1"))
    # a fetch that needs a preflight: refused there, the POST is never sent
    status, error, _ = browser.execute_async_script(GZIP_FETCH, f"http://{collector.base}/v1/events", PUBLIC,
                                                    [{"type": "never"}])
    assert status == 0 and "TypeError" in error
    wait_until(lambda: totals(collector)["cors_refused"] >= refused + 1, WAIT, "the refused preflight")
    # the snippet's own fetch (no preflight): sent, 403 for a public key from this origin, and
    # the browser withholds the answer from the page (no CORS header): a network error to it
    browser.execute_script("""meteorit.track("never", {n: 1}); meteorit.flush();""")
    wait_until(lambda: browser.execute_script("return meteorit.stats().dropped") == 1, WAIT,
               "the snippet to give the batch up (maxRetries 0)")
    # and the beacon as the page is left: 403 too
    browser.execute_script("""meteorit.track("never", {n: 2}); meteorit.track("never", {n: 3});""")
    browser.get(pages.url("blank.html", host="127.0.0.1"))
    wait_until(lambda: totals(collector)["events_rejected"].get("forbidden", 0) == forbidden + 2, WAIT,
               "the fetch and the beacon refused")
    assert redis.llen(QUEUE) == 0


def test_an_img_pixel_queues_its_event(browser: webdriver.Chrome, collector: Meteorit, pages: Pages,
                                       redis: redislib.Redis) -> None:
    src = f"http://{collector.base}/v1/pixel.gif?key={PUBLIC}&type=open&campaign=spring&email=e-42"
    browser.get(pages.url(pages.add("mail.html", f"""<!doctype html><meta charset="utf-8"><title>mail</title>
<p>Hello</p><img id="px" alt="" width="1" height="1" src="{src}">""")))
    [event] = wait_for_events(redis, 1, "the pixel's event")
    assert {k: event[k] for k in ("type", "campaign", "email")} == {"type": "open", "campaign": "spring",
                                                                     "email": "e-42"}
    assert "key" not in event and "origin" not in event["context"]  # an <img> sends no Origin
    size = browser.execute_async_script("""
        const [done] = arguments, img = document.getElementById("px");
        const report = () => done([img.complete, img.naturalWidth, img.naturalHeight]);
        img.complete ? report() : (img.onload = img.onerror = report);""")
    assert size == [True, 1, 1]  # a GIF the browser decoded: no broken image
