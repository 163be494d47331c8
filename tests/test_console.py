"""The web console (`/ui`) on a tiny real store: its JSON endpoints over real HTTP on loopback, the admin
endpoints it uses, versioned models (DOMAIN@vK), and the page itself in a real headless Chromium driven
by Playwright (Debian's `chromium`, through `executable_path`). The browser tests are skipped, with the
reason, only where Playwright or a Chromium cannot be found."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import httpx
import pytest

from crma.routing import BASE, REASON_TEXT, REASONS, explain_text
from crma.serve.console import tail_records
from crma.serve.telemetry import Telemetry, bucket_quantile
from crma.store import Store
from crma.store.summary import describe
from tests.test_serve import add, copy_store, serving, wait_for, write_cycles

TOKEN = "admin-s3cret"
KEY, LIMITED = "key-0123456789", "key-down-only"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cycles(tmp_path_factory.mktemp("console_data"), 300)


@pytest.fixture(scope="module")
def store(data, tmp_path_factory) -> Path:
    """up v1, down v1, up v2: a modular store whose `up` has an earlier version (three backbone versions)."""
    root = tmp_path_factory.mktemp("console_store") / "s"
    add(root, data, "up")
    add(root, data, "down")
    add(root, data, "up", seed=1)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder as crma report writes one: report.md with a table and a plot."""
    import matplotlib  # heavy: only this fixture draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above
    root = tmp_path_factory.mktemp("results")
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    fig.savefig(root / "drift.png")
    plt.close(fig)
    (root / "report.md").write_text("# crma benchmark report\n\n| condition | drift |\n|---|---|\n| naive | +9.54% |\n"
                                    "| modular | +1.36% |\n\n![drift](drift.png)\n\n<script>alert(1)</script>\n")
    return root


def post(url: str, path: str, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


# ---- pure parts ------------------------------------------------------------------------------------------

def test_bucket_quantile_interpolates_as_prometheus():
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (float("inf"), 8.0)]
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (4 - 2) / (6 - 2))      # rank 4 in (0.1, 0.5]
    assert bucket_quantile(buckets, 0.25) == pytest.approx(0.1)                               # rank 2: the bound
    assert bucket_quantile(buckets, 1.0) == pytest.approx(1.0)
    assert bucket_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert bucket_quantile([(0.1, 1.0), (float("inf"), 4.0)], 0.9) == pytest.approx(0.1)      # in +Inf: last bound


def test_route_log_tail_reads_rotated_files_only_as_needed(tmp_path):
    log = tmp_path / "route.jsonl"
    (tmp_path / "route.jsonl.1").write_text("".join(json.dumps({"id": k}) + "\n" for k in range(3)))
    log.write_text(json.dumps({"id": 3}) + "\n{half a line\n" + json.dumps({"id": 4}) + "\n")
    assert [r["id"] for r in tail_records(log, 2)] == [4, 3]                  # the newest file is enough
    assert [r["id"] for r in tail_records(log, 4)] == [4, 3, 2, 1]            # then the rotated one
    assert [r["id"] for r in tail_records(log, 50)] == [4, 3, 2, 1, 0]


def test_telemetry_snapshot_reads_the_metrics_counters():
    t = Telemetry()
    for domain, ttft in (("up", 0.02), ("up", 0.2), ("down", 0.4)):
        t.finished({"model": "auto", "domain": domain, "status": "200", "prompt_tokens": 5, "completion_tokens": 3,
                    "ttft_s": ttft, "total_s": ttft + 0.1})
    t.refused("up", 401)
    s = t.snapshot()
    assert s["requests"] == 4 and s["by_domain"] == {"up": 2, "down": 1, "-": 1}
    assert s["by_status"] == {"200": 3, "401": 1} and s["generated_tokens"] == 9 and s["prompt_tokens"] == 15
    assert s["ttft"]["count"] == 3 and s["ttft"]["mean"] == pytest.approx(0.62 / 3)
    assert 0.1 < s["ttft"]["p50"] <= 0.25                                  # the 2nd of 3 lies in (0.1, 0.25]
    assert s["ttft"]["p50"] == pytest.approx(bucket_quantile([(b, c) for b, c in _buckets(t)], 0.5))


def _buckets(t: Telemetry):
    for metric in t.registry.collect():
        for s in metric.samples:
            if s.name == "crma_time_to_first_token_seconds_bucket":
                yield float(s.labels["le"]), s.value


def test_describe_has_every_version_pinned_and_no_paths_or_commands(store):
    d = describe(Store(store))
    up = next(x for x in d["domains"] if x["name"] == "up")
    assert up["current"] == 2 and [v["version"] for v in up["versions"]] == [1, 2]
    assert [v["backbone_version"] for v in up["versions"]] == [1, 3]             # each on the backbone it trained
    assert d["backbone"]["current"] == 3 and len(d["router"]["versions"]) == 3
    v2 = up["versions"][1]
    assert v2["holdout_loss"] < v2["base_loss"] and v2["data"]["train"]["passages"] == 24
    assert len(v2["files"]["adapter_model.safetensors"]) == 64
    assert [e["op"] for e in d["log"]] == ["add", "add", "add"]
    assert [e["router_version"] for e in d["log"]] == [1, 2, 3]                  # the router each add wrote
    assert [e["router_version"] for e in describe(Store.view(store, _older(Store(store).manifest)))["log"]] == [1, 2, 3]
    text = json.dumps(d)
    assert str(store) not in text and "command" not in text and "crma add" not in text


def _older(manifest: dict) -> dict:
    """The manifest as stores written before the log recorded router versions hold it."""
    m = copy.deepcopy(manifest)
    for e in m["log"]:
        e.pop("router_version", None)
    return m


def test_explain_text_agrees_with_the_decision_and_sums_to_one(store):
    from crma.engine.live import LiveModel  # heavy: the model
    s = Store(store)
    live = LiveModel.open(s)
    router = s.router()
    out = explain_text(router, live.model, live.tokenizer, "abcdabcdabcdabcdabcdabcdabcdabcd")
    assert sum(d["probability"] for d in out["domains"]) == pytest.approx(1.0)
    assert out["domains"][0]["domain"] == out["best"] and out["confidence"] == pytest.approx(
        out["domains"][0]["probability"])
    assert (out["decision"] == BASE) == (out["reason"] is not None)
    assert set(REASON_TEXT) == set(REASONS)                                  # every abstention reason explained
    empty = explain_text(router, live.model, live.tokenizer, "   ")
    assert empty["decision"] == BASE and empty["reason"] == "empty" and empty["domains"] == []


# ---- the endpoints over HTTP -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def console(store, results, tmp_path_factory):
    """A server on a copy of the store, with the admin token, a routing log and a results folder."""
    root = tmp_path_factory.mktemp("console_live") / "store"
    shutil.copytree(store, root)
    log = root.parent / "route.jsonl"
    with serving(root, admin_token=TOKEN, route_log=log, results=results, versions=True) as (url, server):
        yield url, server, root


def test_console_endpoints(console):
    url, server, root = console
    page = httpx.get(url + "/ui/", timeout=30)
    assert page.status_code == 200 and 'id="view-store"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/ui", follow_redirects=False).status_code == 307
    assert httpx.get(url + "/ui/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/ui/static/..%2Fconsole.py").status_code == 404
    assert httpx.get(url + "/ui/static/app.py").status_code == 404
    st = httpx.get(url + "/ui/api/store").json()
    assert [d["name"] for d in st["store"]["domains"]] == ["up", "down"] and st["admin"] and st["results"]
    assert {"up", "down", "up@v1", "up@v2", "down@v1", "auto", "base"} <= set(st["serving"]["models"])
    assert st["serving"]["routes"]["up@v1"] == {"domain": "up", "adapter_version": 1, "backbone_version": 1}
    r = post(url, "/ui/api/route", {"text": "dcbadcbadcbadcbadcbadcbadcba"}).json()
    assert r["router_version"] == 3 and {d["domain"] for d in r["domains"]} == {"up", "down"}
    assert post(url, "/ui/api/route", {"txt": "x"}).status_code == 400
    rep = httpx.get(url + "/ui/api/results").json()
    assert "<table>" in rep["html"] and "data:image/png;base64," in rep["html"]
    assert "<script>" not in rep["html"]                                # raw HTML in report.md stays text
    live = httpx.get(url + "/ui/api/live").json()
    assert live["serving"]["snapshot"] == server.registry.current.serial and "ttft" in live["metrics"]


def test_versioned_models_serve_their_own_version(console):
    url, _, _ = console
    outs = {}
    for model in ("up", "up@v2", "up@v1"):
        body = post(url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "abcd"}],
                                                   "max_tokens": 8, "temperature": 0}).json()
        outs[model] = body
        assert body["crma"]["domain"] == "up"
    assert outs["up@v1"]["crma"]["adapter_version"] == 1 and outs["up@v1"]["crma"]["backbone_version"] == 1
    assert outs["up@v2"]["crma"]["adapter_version"] == 2 and outs["up@v2"]["crma"]["backbone_version"] == 3
    assert outs["up"]["choices"][0]["message"] == outs["up@v2"]["choices"][0]["message"]
    assert post(url, "/v1/chat/completions", {"model": "up@v9", "messages": [{"role": "user", "content": "a"}]}
                ).status_code == 404
    log = httpx.get(url + "/ui/api/route-log?n=5").json()
    assert log["enabled"] and log["records"][0]["model"] == "up@v1"                   # newest first


def test_admin_rollback_and_remove_need_the_token_and_change_the_store(store, tmp_path):
    root = copy_store(store, tmp_path)
    with serving(root, admin_token=TOKEN) as (url, server):
        before = (root / "manifest.json").read_bytes()
        assert post(url, "/admin/rollback", {"domain": "up"}).status_code == 401
        assert post(url, "/admin/rollback", {"domain": "up"}, token="wrong-token").status_code == 401
        assert post(url, "/admin/rollback", {"domain": "nope"}, token=TOKEN).status_code == 409
        assert post(url, "/admin/rollback", {"domain": "down"}, token=TOKEN).status_code == 409   # no earlier version
        assert post(url, "/admin/rollback", {"domain": 3}, token=TOKEN).status_code == 400
        assert (root / "manifest.json").read_bytes() == before                          # nothing changed
        r = post(url, "/admin/rollback", {"domain": "up", "to": "v1"}, token=TOKEN)
        assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["reload"]["status"] == "reloaded"
        assert Store(root).adapter_meta("up")["version"] == 1
        assert server.registry.current.routes["up"].backbone_version == 1
        assert post(url, "/admin/remove", {"domain": "down"}, token=TOKEN).status_code == 200
        assert "down" not in server.registry.current.models() and Store(root).domains() == ["up"]
        for manifest in (Store(root).manifest, _older(Store(root).manifest)):    # recorded, or derived
            log = describe(Store.view(root, manifest))["log"]
            assert [(e["op"], e["router_version"]) for e in log[-2:]] == [("rollback", 4), ("remove", 5)]
        assert post(url, "/admin/explode", {"domain": "up"}, token=TOKEN).status_code == 404
    with serving(root) as (url, _):                                  # no admin token: no admin endpoints
        assert post(url, "/admin/rollback", {"domain": "up"}, token=TOKEN).status_code == 404


def test_keys_guard_the_console_and_limit_what_it_shows(store):
    with serving(store, api_key=[KEY, f"{LIMITED}=down"], admin_token=TOKEN) as (url, _):
        assert httpx.get(url + "/ui/").status_code == 200                    # the page holds no data
        for path in ("/ui/api/store", "/ui/api/live", "/ui/api/route-log"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer nope-nope-nope"}).status_code == 401
        assert post(url, "/ui/api/route", {"text": "abcd"}).status_code == 401
        full = httpx.get(url + "/ui/api/store", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [d["name"] for d in full["store"]["domains"]] == ["up", "down"]
        assert httpx.get(url + "/ui/api/store", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        part = httpx.get(url + "/ui/api/store", headers={"Authorization": f"Bearer {LIMITED}"}).json()
        assert [d["name"] for d in part["store"]["domains"]] == ["down"]
        assert not any(m.startswith("up") for m in part["serving"]["models"])
        r = post(url, "/ui/api/route", {"text": "abcdabcdabcdabcd"}, token=LIMITED).json()
        assert [d["domain"] for d in r["domains"]] == ["down"]


def test_no_ui_and_results_without_a_report(store, tmp_path):
    from crma.config import ConfigError
    from crma.serve.config import ServeConfig
    with pytest.raises(ConfigError, match="report.md"):
        ServeConfig(store=store, results=tmp_path)
    with serving(store, ui=False) as (url, _):
        assert httpx.get(url + "/ui/").status_code == 404 and httpx.get(url + "/ui/api/store").status_code == 404
        assert httpx.get(url + "/ui/api/results").status_code == 404


# ---- the page in a real browser --------------------------------------------------------------------------

def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install crma[test])")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    with sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page of the console with its console errors collected."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.expected: list[str] = []            # refusals a test provokes: the browser logs them as errors
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(30_000)
        self.page.goto(url + "/ui/")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def make(url: str, **context) -> Page:
        pages.append(Page(browser, url, **context))
        return pages[-1]

    yield make
    for p in pages:
        p.close()
        errors = [e for e in p.errors if not any(x in e for x in p.expected)]
        assert not errors, f"console errors: {errors}"


def test_browser_store_view_chat_side_by_side_router_live_results(console, data, open_page):
    url, server, root = console
    p = open_page(url)
    page = p.page
    page.wait_for_selector('#domains > tbody > tr[data-domain="down"]')
    assert page.locator("#domains > tbody > tr[data-domain]").count() == 2
    assert not page.locator("#versions-up").is_visible()
    page.get_by_role("button", name="Versions of up").click()                   # every version, on demand
    assert page.locator("#versions-up tbody tr").count() == 2 and page.locator("#versions-up").is_visible()
    assert page.locator('#domains > tbody > tr[data-domain="up"] > td').nth(0).inner_text() == "v2"
    assert page.locator("#pinning circle").count() == 3 and page.locator("#pinning circle.on").count() == 2
    assert page.locator("#timeline li").count() == 3
    # the playground: auto streams an answer and says which domain served it
    page.get_by_role("tab", name="Playground").click()
    page.select_option("#model-a", "auto")
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions") else None)
    text = json.loads((data / "up.jsonl").read_text().splitlines()[0])["text"]      # a passage `up` trained on
    expected = post(url, "/ui/api/route", {"text": text}).json()
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    meta = page.locator("#pane-a .msg.assistant .meta")
    meta.filter(has_text="backbone v").wait_for()
    served = f"{expected['decision']} v" if expected["decision"] != BASE else "router abstained"
    assert served in meta.inner_text() and "confidence" in meta.inner_text()
    assert page.locator("#pane-a .msg.assistant .text").inner_text().strip()
    assert streamed and streamed[0].startswith("text/event-stream")
    # side by side: one prompt, two models, two answers
    page.get_by_label("Side by side").check()
    page.select_option("#model-a", "up@v1")
    page.select_option("#model-b", "up@v2")
    page.fill("#prompt", "abcdabcd")
    page.get_by_role("button", name="Send").click()
    page.locator("#pane-b .msg.assistant .meta").filter(has_text="backbone v3").wait_for()
    page.locator("#pane-a .msg.assistant .meta").filter(has_text="backbone v1").wait_for()
    assert page.locator("#pane-a .msg.assistant").get_attribute("data-model") == "up@v1"
    assert page.locator("#pane-b .msg.assistant").get_attribute("data-model") == "up@v2"
    # the router view: scores of every domain and the background class, the decision
    page.get_by_role("tab", name="Router").click()
    page.fill("#route-text", "dcbadcbadcbadcbadcbadcba")
    page.get_by_role("button", name="Route").click()
    page.locator("#route-decision").wait_for()
    assert page.locator("#route-result .bar-row").count() == 3                  # up, down, background
    page.locator("#route-log tbody tr").first.wait_for()
    # live: the requests just made, from the /metrics counters, without a reload
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-domains .bar-row").first.wait_for()
    wait_for(lambda: int(page.locator("#live-cards .card .value").first.inner_text().replace(",", "")) >= 3,
             what="the live view to count the requests")               # the next poll, without a reload
    # results: crma report's tables and plots
    page.get_by_role("tab", name="Results").click()
    page.locator("#results table").wait_for()
    assert page.locator("#results img").evaluate("img => img.complete && img.naturalWidth > 0")
    # keyboard: arrow keys move between tabs
    page.get_by_role("tab", name="Results").focus()
    page.keyboard.press("Home")
    assert page.evaluate("document.activeElement.id") == "tab-store"
    assert page.locator("#view-store").is_visible()


def test_browser_new_domain_appears_and_rollback_needs_the_token(store, data, tmp_path, open_page):
    root = copy_store(store, tmp_path)
    with serving(root, admin_token=TOKEN) as (url, server):
        p = open_page(url)
        page = p.page
        page.wait_for_selector('#domains > tbody > tr[data-domain="down"]')
        page.evaluate("window.__same_page = true")
        add(root, data, "zig")                                    # crma add into the served store, then a reload
        assert server.reload()["status"] == "reloaded"
        page.wait_for_selector('#domains > tbody > tr[data-domain="zig"]')
        assert page.evaluate("window.__same_page === true")         # no page reload
        assert "zig" in page.locator("#model-a option").all_inner_texts()
        # rollback without the admin token: refused, nothing changes
        p.expected.append("status of 401")
        before = (root / "manifest.json").read_bytes()
        page.get_by_role("button", name="Roll back up").click()
        page.get_by_role("button", name="Confirm").click()
        page.locator("#confirm-error").filter(has_text="Refused").wait_for()
        assert (root / "manifest.json").read_bytes() == before
        page.fill("#admin-token", "not-the-token")
        page.get_by_role("button", name="Confirm").click()
        page.locator("#confirm-error").filter(has_text="admin token").wait_for()
        assert (root / "manifest.json").read_bytes() == before
        page.fill("#admin-token", TOKEN)                              # with it: served at once
        page.get_by_role("button", name="Confirm").click()
        page.locator('#domains > tbody > tr[data-domain="up"] > td').first.filter(has_text="v1").wait_for()
        assert Store(root).adapter_meta("up")["version"] == 1
        wait_for(lambda: server.registry.current.routes["up"].adapter_version == 1, what="rollback served")


def test_browser_api_key_sign_in_and_phone_width(store, open_page):
    with serving(store, api_key=[KEY]) as (url, _):
        p = open_page(url, viewport={"width": 390, "height": 844})
        p.expected.append("status of 401")                # the first request, before signing in
        page = p.page
        page.get_by_role("textbox", name="API key").wait_for()
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector('#domains > tbody > tr[data-domain="up"]')
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page is wider than a phone screen: {width}"
        page.get_by_role("tab", name="Playground").click()
        assert page.get_by_label("Model", exact=True).is_visible() and page.get_by_label("Message").is_visible()
