"""Screenshots of the web console (docs/serving.md#the-web-console) on the SmolLM2 demo store.

    python benchmarks/console_screenshots.py [--store runs/console-demo] [--results benchmarks/results/cl5-cpu-tasks]
                                             [--out docs/images] [--chromium /usr/bin/chromium]

The store, when missing, is the demo's modular store (`crma demo --conditions modular`, into runs/demo/)
copied, plus a second version of `cooking` (`crma add` with another seed: a domain with two versions, on two
backbone versions). Starts `crma serve --versions` on it, with a routing log, the admin token and the
results folder; sends a little traffic through the
`openai` client; then drives a headless Chromium through every view at 1280x800 (and the store view at
phone width) and writes docs/images/console-{store,playground,router,live,results,phone}.png.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [("auto", "How long should bread dough rise before baking?"),
             ("auto", "What is a red giant star?"),
             ("auto", "My espresso machine shows a descale warning. What should I do?"),
             ("auto", "Who won the football match yesterday?"),
             ("contracts", "What does an indemnification clause do?")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_store(store: Path) -> None:
    if (store / "manifest.json").is_file():
        return
    demo = ROOT / "runs/demo/modular"
    if not (demo / "manifest.json").is_file():
        print("building the demo store (crma demo --conditions modular)", flush=True)
        subprocess.run([sys.executable, "-m", "crma", "demo", "--conditions", "modular", "--out", str(demo.parent)],
                       check=True)
    shutil.copytree(demo, store)
    data = ROOT / "crma/demo_data/cooking"
    print("adding cooking v2 (seed 1)", flush=True)
    subprocess.run([sys.executable, "-m", "crma", "add", "--store", str(store), "--domain", "cooking",
                    "--data", f"{data / 'train.jsonl'}:{data / 'holdout.jsonl'}",
                    "--route-examples", str(data / "queries.jsonl"), "--epochs", "2", "--lr", "1e-3",
                    "--batch-size", "4", "--max-len", "128", "--seed", "1"], check=True)


def serve(store: Path, results: Path, work: Path, port: int) -> subprocess.Popen:
    token = work / "admin-token"
    token.write_text("screenshot-admin-token\n")
    token.chmod(0o600)
    cmd = [sys.executable, "-m", "crma", "serve", "--store", str(store), "--port", str(port),
           "--admin-token-file", str(token), "--route-log", str(work / "route.jsonl"), "--results", str(results),
           "--versions", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"crma serve exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit("crma serve did not start within 300 s")


def traffic(url: str) -> None:
    """The questions, four at a time."""
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def ask(pair):
        model, question = pair
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=24, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, QUESTIONS))


def shoot(url: str, out: Path, chromium: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(300_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def save(name: str, full: bool = True) -> None:
            path = out / f"console-{name}.png"
            page.screenshot(path=str(path), full_page=full)
            shots.append(path)
            print(f"wrote {path}", flush=True)

        page.goto(url + "/ui/")
        page.wait_for_selector("#domains > tbody > tr")
        page.get_by_role("button", name="Versions of cooking").click()
        save("store")
        page.get_by_role("tab", name="Playground").click()
        page.get_by_label("Side by side").check()
        page.select_option("#model-a", "cooking@v1")
        page.select_option("#model-b", "cooking@v2")
        page.fill("#max-tokens", "40")
        page.fill("#prompt", "How long should I knead bread dough?")
        page.get_by_role("button", name="Send").click()
        page.locator("#pane-b .msg.assistant .meta").filter(has_text="backbone").wait_for()
        page.locator("#pane-a .msg.assistant .meta").filter(has_text="backbone").wait_for()
        page.locator("#send:not([disabled])").wait_for()              # both answers complete
        save("playground", full=False)
        page.get_by_role("tab", name="Router").click()
        page.fill("#route-text", "What is the difference between a nebula and a galaxy?")
        page.get_by_role("button", name="Route").click()
        page.locator("#route-decision").wait_for()
        page.locator("#route-log tbody tr").first.wait_for()
        save("router")
        page.get_by_role("tab", name="Live").click()
        load = threading.Thread(target=traffic, args=(url,))        # requests while the view polls
        load.start()
        time.sleep(20)
        save("live")
        load.join()
        page.get_by_role("tab", name="Results").click()
        page.locator("#results table").first.wait_for()
        save("results", full=False)
        page.set_viewport_size({"width": 390, "height": 844})
        page.get_by_role("tab", name="Store").click()
        save("phone", full=False)
        browser.close()
        if errors:
            raise SystemExit(f"page errors: {errors}")
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "runs/console-demo")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/cl5-cpu-tasks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/images")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium PATH")
    ensure_store(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = serve(args.store, args.results, Path(tmp), port)
        try:
            url = f"http://127.0.0.1:{port}"
            traffic(url)
            shoot(url, args.out, args.chromium)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
