"""Fault injection: replay hostile and careless use against crma on tiny stores, loopback only.

    OMP_NUM_THREADS=1 python benchmarks/fault_injection.py [--out DIR] [--only SUBSTR] [--keep] [--jobs N]

Every case drives the real CLI (`crma add`, `crma store ...`, `crma eval`, `crma generate`, `crma serve`) in
subprocesses, and the server over HTTP on 127.0.0.1 (standard library only: http.client and sockets). One
tiny base store (tiny:llama, modular: cooking then astronomy, the bundled demo data) is made at the start;
a case that changes a store works on a copy of it. Each case has a timeout; its processes are killed when
it ends. The script prints a table (case | what was done | expected | held | detail) and writes
DIR/fault_injection.json and DIR/fault_injection.md (each a temp file, then os.replace). Exit status 0
only when every case that ran held; a case that cannot be run here (e.g. a read-only store when running
as root, whose writes chmod does not stop) is reported as skipped, with the reason.

Concurrent writers are raced deterministically with crma's test hook (CRMA_STORE_PAUSE=<point> with
CRMA_STORE_RESUME=<file>: a writer announces the point on stdout and waits there), the same hook kills a
writer at an exact moment of its registration. The crma tested is the one this interpreter imports (the
repository's, installed editable; to test a commit: `git archive C crma | tar -x -C D` and PYTHONPATH=D).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import metadata, util
from pathlib import Path

from faults.harness import (
    ENV,
    REPO,
    TOKEN,
    Case,
    Ctx,
    LiveServer,
    NotHeld,
    Proc,
    Result,
    Skipped,
    add_args,
    manifest,
    short,
)
from faults.server_cases import (
    case_body_2mb,
    case_cross_origin,
    case_evil_host,
    case_half_request,
    case_health_no_paths,
    case_idle_connections,
    case_lone_surrogate,
    case_streams_and_tiny_temperature,
    case_temperature_bool,
    case_temperature_nan,
    case_temperature_string,
    case_token_not_in_ps,
)
from faults.store_cases import (
    case_damaged_adapter_eval,
    case_damaged_adapter_serve,
    case_damaged_adapter_verify_repair,
    case_first_add_interrupted,
    case_kill_after_3s,
    case_kill_before_manifest_rename,
    case_kill_before_version_rename,
    case_kill_in_training,
    case_linked_adapter_folder,
    case_linked_lock,
    case_linked_registered_domain,
    case_manifest_missing_key,
    case_manifest_truncated,
    case_race_conditions,
    case_race_domains,
    case_race_models,
    case_read_only_store,
    case_sweep_spares_user_files,
)

from crma.io import write_text

CASES = [
    Case("serve/8-streams+tiny-temperature", "8 streamed chats (4 models) and one completion at temperature 1.5e-39,"
         " released together", "all 8 complete; the hostile one 200 (greedy) or 400, never 500",
         case_streams_and_tiny_temperature, 120, "server"),
    Case("serve/temperature-string", 'completion with "temperature": "4"', "400 naming temperature",
         case_temperature_string, 30, "server"),
    Case("serve/temperature-bool", 'completion with "temperature": true', "400 naming temperature",
         case_temperature_bool, 30, "server"),
    Case("serve/temperature-nan", 'completion with "temperature": NaN (a JSON extension)', "400 naming temperature",
         case_temperature_nan, 30, "server"),
    Case("serve/lone-surrogate", 'chat content "hi \\ud800", prompt "abc\\ud800"', "400 (no 500, no crash)",
         case_lone_surrogate, 30, "server"),
    Case("serve/2mb-body", "2 MB JSON body, once with Content-Length, once chunked", "413 both times",
         case_body_2mb, 60, "server"),
    Case("serve/evil-host", "GET /v1/models with Host: evil.example (3 spellings)", "refused (400/403/421)",
         case_evil_host, 30, "server"),
    Case("serve/cross-origin", "POST text/plain with Origin: http://evil.example; without Origin; a CORS preflight",
         "refused, no completion run", case_cross_origin, 30, "server"),
    Case("serve/health-no-paths", "GET /health without the admin token", "no filesystem path in it",
         case_health_no_paths, 30, "server"),
    Case("serve/150-idle-connections", "150 connections opened and left silent, then a normal request",
         "request succeeds within a few s; idle ones closed after the timeout (2 s)", case_idle_connections, 60,
         "server"),
    Case("serve/half-request", "half a request line sent, then silence", "408 and closed after ~2 s",
         case_half_request, 30, "server"),
    Case("serve/admin-token-in-ps", "server started with --admin-token-file", "token not in /proc/PID/cmdline or ps",
         case_token_not_in_ps, 30, "server"),
    Case("store/race-first-add-models", "two first adds on an empty folder, --model tiny:llama vs tiny:gpt2, "
         "both trained, then registering one after the other", "one registers, the other refused clearly; verify 0,"
         " generate works", case_race_models, 150, "fresh"),
    Case("store/race-first-add-conditions", "the same with --condition modular vs frozen",
         "one registers, the other refused clearly; verify 0, generate works", case_race_conditions, 150, "fresh"),
    Case("store/race-two-domains", "two adds (contracts, baking) on one modular store, both trained from v2",
         "no lost backbone: chain consistent, second refused or on top; verify 0", case_race_domains, 150),
    Case("store/linked-adapter-folder", "adapters/x -> a folder outside with v1/, v2/, .tmp-keep/; rollback, add x",
         "both refused; outside untouched", case_linked_adapter_folder, 90),
    Case("store/linked-registered-domain", "adapters/cooking replaced by a link to an outside copy holding a v7/; "
         "a writer (store remove astronomy) sweeps", "outside untouched", case_linked_registered_domain, 60),
    Case("store/linked-lock", ".lock -> an outside file (then a dangling link); store remove",
         "refused; outside file unchanged, nothing created", case_linked_lock, 60),
    Case("store/sweep-user-folders", "vault/, v2.bak/, backbone/vault/, ... and crma leftovers; a writer sweeps",
         "user folders survive, only crma's leftovers go", case_sweep_spares_user_files, 60),
    Case("store/kill-add-3s", "SIGKILL crma add 3 s after its start", "store verifies; next add succeeds",
         case_kill_after_3s, 120),
    Case("store/kill-add-training", "SIGKILL crma add 0.5 s after it printed its start (training)",
         "store verifies; next add succeeds", case_kill_in_training, 120),
    Case("store/kill-add-version-rename", "SIGKILL crma add at registration, a version folder written, not renamed",
         "store verifies; next add succeeds", case_kill_before_version_rename, 120),
    Case("store/kill-add-manifest-rename", "SIGKILL crma add with the new manifest written, not renamed",
         "store verifies; next add succeeds", case_kill_before_manifest_rename, 120),
    Case("store/first-add-interrupted", "SIGKILL the first add on an empty folder before its manifest rename",
         "next add takes the folder over; verify 0", case_first_add_interrupted, 120, "fresh"),
    Case("store/damaged-adapter-serve", "one byte flipped in cooking's adapter weights; crma serve",
         "starts; /health lists cooking unavailable; others answer", case_damaged_adapter_serve, 90),
    Case("store/damaged-adapter-verify", "the same; store verify, then (router flipped too) verify --repair",
         "verify reports cooking; --repair rebuilds the router, says what it cannot fix",
         case_damaged_adapter_verify_repair, 90),
    Case("store/damaged-adapter-eval", "the same; crma eval on cooking and astronomy",
         "exit 1, astronomy evaluated, cooking marked damaged", case_damaged_adapter_eval, 90),
    Case("store/manifest-missing-key", "domains.cooking.current deleted; store list, add",
         "clear error naming the key, no traceback, no training", case_manifest_missing_key, 90),
    Case("store/manifest-truncated", "manifest.json cut in half; store show, serve", "clear error, no traceback",
         case_manifest_truncated, 90),
    Case("store/read-only", "chmod -R a-w on the store; store show, eval, add",
         "show/eval work; add fails cleanly before training", case_read_only_store, 90),
]


# ---- the runner ------------------------------------------------------------------------------------------------
def run_case(case: Case, work: Path, base: Path | None, server: LiveServer | None) -> Result:
    """Run one case in a thread with its timeout; its processes are killed when it ends or times out."""
    folder = work / case.name.replace("/", "_")
    folder.mkdir(parents=True)
    ctx = Ctx(folder, base, server, case.timeout)
    outcome: list[tuple[str, str]] = []

    def body() -> None:
        try:
            outcome.append(("yes", case.func(ctx)))
        except NotHeld as err:
            outcome.append(("no", str(err)))
        except Skipped as err:
            outcome.append(("skipped", str(err)))
        except Exception as err:            # noqa: BLE001 -- an unexpected failure is a case that did not hold
            outcome.append(("no", f"{type(err).__name__}: {err}"))
    t = time.monotonic()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(case.timeout + 5)
    if thread.is_alive():
        ctx.cleanup()                       # unblocks the case's waits
        thread.join(20)
        outcome.insert(0, ("no", f"timed out after {case.timeout:.0f} s"))
    ctx.cleanup()
    held, detail = outcome[0] if outcome else ("no", "the case ended without a result")
    return Result(case.name, case.did, case.expected, held, short(detail, 400), round(time.monotonic() - t, 1))


def make_base(work: Path) -> tuple[Path, str]:
    """The tiny base store: tiny:llama, modular, cooking (backbone v1) then astronomy (v2)."""
    root = work / "base"
    for domain, extra in (("cooking", ["--model", "tiny:llama"]), ("astronomy", [])):
        done = Proc(work, f"base-{domain}", add_args(root, domain, None, *extra)).wait(180)
        if done.rc != 0:
            sys.exit(f"fault_injection: making the base store failed at {domain} (exit {done.rc}):\n{done.err[-2000:]}")
    return root, f"{', '.join(manifest(root)['domains'])} on {manifest(root)['model']['spec']}"


def environment() -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    crma_path = Path(util.find_spec("crma").origin).parent
    in_repo = crma_path == REPO / "crma"            # else e.g. an export of a commit on PYTHONPATH
    return {"python": platform.python_version(), "torch": version("torch"), "crma": version("crma"),
            "crma_path": str(crma_path), "git_commit": git("rev-parse", "HEAD"),
            "crma_tree_dirty": bool(git("status", "--porcelain", "crma")) if in_repo else None,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": {"OMP_NUM_THREADS": ENV["OMP_NUM_THREADS"], "crma serve --threads": 1},
            "euid": os.geteuid()}


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(results: list[Result]) -> str:
    rows = ["| case | what was done | expected | held | detail | s |", "|---|---|---|---|---|---|"]
    rows += [f"| {cell(r.case)} | {cell(r.did)} | {cell(r.expected)} | {r.held} | {cell(r.detail)} | {r.seconds} |"
             for r in results]
    return "\n".join(rows)


def totals(results: list[Result]) -> tuple[int, int, int]:
    tried = [r for r in results if r.held != "skipped"]
    return len(tried), sum(r.held == "yes" for r in tried), len(results) - len(tried)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the results go")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (stores, logs of every command)")
    parser.add_argument("--jobs", type=int, default=2, help="store cases run this many at a time (default 2; the "
                                                           "server cases always run one at a time)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only in c.name]
    if not cases:
        parser.error(f"no case name contains {args.only!r}: {', '.join(c.name for c in CASES)}")
    started, load_before = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="crma-fault-"))
    results: list[Result] = []
    setup: dict[str, float] = {}
    server = None
    try:
        base = None
        if any(c.group != "fresh" for c in cases):
            t = time.monotonic()
            base, what = make_base(work)
            setup["base_store_s"] = round(time.monotonic() - t, 1)
            print(f"base store: {what} ({setup['base_store_s']} s)", file=sys.stderr, flush=True)
        if any(c.group == "server" for c in cases):
            t = time.monotonic()
            token_file = work / "admin-token"
            token_file.write_text(TOKEN + "\n")
            token_file.chmod(0o600)
            server = LiveServer(work, base, ["--admin-token-file", str(token_file)])
            try:
                server.wait_ready(120)
            except NotHeld as err:
                server.stop()
                server = None
                print(f"the server did not start: {err}", file=sys.stderr, flush=True)
            setup["server_start_s"] = round(time.monotonic() - t, 1)
        done = []

        def one(case: Case) -> Result:
            if case.group == "server" and server is None:
                result = Result(case.name, case.did, case.expected, "no", "the shared crma serve did not start", 0.0)
            else:
                result = run_case(case, work, base, server)
            done.append(result)
            print(f"[{len(done):2d}/{len(cases)}] {case.name:34s} {result.held:7s} {result.seconds:6.1f} s  "
                  f"{short(result.detail, 90)}", file=sys.stderr, flush=True)
            return result
        by_name = {r.case: r for r in map(one, [c for c in cases if c.group == "server"])}   # the server alone
        if server is not None:
            server.stop()
            server = None
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            by_name |= {r.case: r for r in pool.map(one, [c for c in cases if c.group != "server"])}
        results = [by_name[c.name] for c in cases]
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.monotonic() - started, 1)
    tried, held, skipped = totals(results)
    total = f"{tried} cases tried, {held} held" + (f", {skipped} skipped" if skipped else "")
    print(table(results))
    print(f"\n{total} ({seconds} s)")
    report = {"total": total, "tried": tried, "held": held, "skipped": skipped, "all_held": tried == held,
              "seconds": seconds, "setup_seconds": setup, "only": args.only, "jobs": args.jobs, **environment(),
              "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "cases": [asdict(r) for r in results]}
    write_text(args.out / "fault_injection.json", json.dumps(report, indent=2) + "\n")
    env = report
    write_text(args.out / "fault_injection.md",
                 f"# Fault injection\n\n`python benchmarks/fault_injection.py`: {total}, {seconds} s "
                 f"(--jobs {args.jobs}; python {env['python']}, torch {env['torch']}, OMP_NUM_THREADS=1, "
                 f"{env['cpu_count']} CPUs, "
                 f"load average {load_before[0]:.2f} before, {report['loadavg_after'][0]:.2f} after; "
                 f"repository at commit {env['git_commit'][:10]}, crma from "
                 f"{'its working tree' if env['crma_tree_dirty'] is not None else env['crma_path']}"
                 f"{' (uncommitted changes under crma/)' if env['crma_tree_dirty'] else ''}).\n\n"
                 f"{table(results)}\n")
    return 0 if tried == held else 1


if __name__ == "__main__":
    sys.exit(main())
