"""Fault-injection cases against the model store: racing writers, symbolic links, the sweep, writers killed
at exact moments, damaged files, a broken manifest, a read-only store."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .harness import (
    DEMO,
    Ctx,
    Done,
    LiveServer,
    Skipped,
    add_args,
    backbone_chain,
    error_of,
    expect,
    flip,
    leftovers,
    manifest,
    no_traceback,
    renamed_data,
    short,
    snapshot,
)


def race(ctx: Ctx, first: list[str], second: list[str]) -> tuple[Done, Done]:
    """Two adds train at once and wait just before taking the store lock; then the first registers, and
    after it the second tries (the closest race, made deterministic)."""
    a, b = ctx.start("first", first, pause="before-lock"), ctx.start("second", second, pause="before-lock")
    ctx.wait_output(a, "CRMA_STORE_PAUSED before-lock")
    ctx.wait_output(b, "CRMA_STORE_PAUSED before-lock")
    a.resume()
    done_a = a.wait(ctx.left())
    b.resume()
    return done_a, b.wait(ctx.left())


def serves_after(ctx: Ctx, root: Path, domain: str) -> str:
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    gen = ctx.crma("generate", "--store", str(root), "--domain", domain, "--max-new-tokens", "4", "--temperature", "0",
                   "Knead the dough", name="generate")
    expect(gen.rc == 0 and gen.out.strip(), f"crma generate: exit {gen.rc}: {gen.brief()}")
    return "store verify 0, generate answers"


def first_add_race(ctx: Ctx, option: str, first_value: str, second_value: str) -> str:
    root = ctx.tmp / "store"
    root.mkdir()
    new = ["--model", "tiny:llama"] if option == "--condition" else []
    first, second = race(ctx, add_args(root, "cooking", None, *new, option, first_value),
                         add_args(root, "astronomy", None, *new, option, second_value))
    expect(first.rc == 0, f"the first add failed ({first.rc}): {first.brief()}")
    no_traceback(second, "the second add")
    expect(second.rc == 2 and "meanwhile" in second.err, f"the second add: exit {second.rc}: {second.brief()}")
    expect(first_value in second.err and second_value in second.err, f"the refusal names neither value: "
                                                                      f"{second.brief()}")
    m = manifest(root)
    have = m["model"]["spec"] if option == "--model" else m["condition"]
    expect(have == first_value and list(m["domains"]) == ["cooking"], f"manifest: {have}, {list(m['domains'])}")
    expect(sorted(os.listdir(root / "adapters")) == ["cooking"], f"adapters/: {os.listdir(root / 'adapters')}")
    return f"first 0, second 2: \"{second.brief()}\"; {serves_after(ctx, root, 'cooking')}"


def case_race_models(ctx: Ctx) -> str:
    return first_add_race(ctx, "--model", "tiny:llama", "tiny:gpt2")


def case_race_conditions(ctx: Ctx) -> str:
    return first_add_race(ctx, "--condition", "modular", "frozen")


def case_race_domains(ctx: Ctx) -> str:
    root = ctx.copy_base()
    first, second = race(ctx, add_args(root, "contracts"), add_args(root, "baking", renamed_data(ctx.tmp, "cooking")))
    expect(first.rc == 0, f"the first add failed ({first.rc}): {first.brief()}")
    no_traceback(second, "the second add")
    expect(second.rc in (0, 2), f"the second add: exit {second.rc}: {second.brief()}")
    m = manifest(root)
    problem = backbone_chain(m)
    expect(problem is None, f"backbone chain: {problem}")
    expect(("baking" in m["domains"]) == (second.rc == 0), f"second exit {second.rc} but domains {list(m['domains'])}")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    outcome = "registered on top" if second.rc == 0 else f"refused: \"{second.brief()}\""
    versions = ", ".join(f"v{k}<-{v['parent']}" for k, v in m["backbone"]["versions"].items())
    return f"first 0, second {outcome}; backbone chain {versions} consistent; store verify 0"


# ---- store cases: links and user files inside the store ----------------------------------------------------
def outside_folder(ctx: Ctx) -> Path:
    """A user's folder outside the store with names a careless sweep would take for crma's."""
    folder = ctx.tmp / "outside"
    for rel, text in (("v1/adapter_model.safetensors", "weights"), ("v2/meta.json", "{}"), ("videos/a.mp4", "film"),
                      (".tmp-keep/notes", "keep"), ("readme.txt", "mine")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def case_linked_adapter_folder(ctx: Ctx) -> str:
    root, outside = ctx.copy_base(), outside_folder(ctx)
    (root / "adapters" / "x").symlink_to(outside)
    before, m_before = snapshot(outside), (root / "manifest.json").read_bytes()
    got = []
    for name, args in (("rollback", ["store", "rollback", str(root), "cooking"]),
                       ("add", add_args(root, "x", renamed_data(ctx.tmp, "cooking")))):
        done = ctx.crma(*args, name=name)
        no_traceback(done, f"crma {name}")
        expect(done.rc == 2 and "symbolic link" in done.err, f"crma {name}: exit {done.rc}: {done.brief()}")
        got.append(f"{name} 2")
    expect(snapshot(outside) == before, "the outside folder changed")
    expect((root / "manifest.json").read_bytes() == m_before, "the manifest changed")
    return f"{', '.join(got)}: \"{done.brief()}\"; outside folder and manifest unchanged"


def case_linked_registered_domain(ctx: Ctx) -> str:
    root, outside = ctx.copy_base(), ctx.tmp / "outside-cooking"
    shutil.copytree(root / "adapters" / "cooking", outside)        # the real files, so hashes still match
    (outside / "v7").mkdir()
    (outside / "v7" / "meta.json").write_text('{"mine": true}')   # looks like an unreferenced crma version
    shutil.rmtree(root / "adapters" / "cooking")
    (root / "adapters" / "cooking").symlink_to(outside)
    before = snapshot(outside)
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")   # a writer: it sweeps
    no_traceback(done, "crma store remove")
    expect(snapshot(outside) == before, f"the outside folder changed (remove exit {done.rc})")
    return f"store remove astronomy: exit {done.rc}: \"{done.brief()}\"; outside folder (with v7/) unchanged"


def case_linked_lock(ctx: Ctx) -> str:
    root, secret, missing = ctx.copy_base(), ctx.tmp / "secret.txt", ctx.tmp / "created-by-nobody"
    secret.write_text("precious")
    before = (secret.read_bytes(), secret.stat().st_mtime_ns)
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(secret)
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")
    no_traceback(done, "crma store remove")
    expect(done.rc == 2 and "symbolic link" in done.err, f"exit {done.rc}: {done.brief()}")
    expect((secret.read_bytes(), secret.stat().st_mtime_ns) == before, "the outside file changed")
    (root / ".lock").unlink()
    (root / ".lock").symlink_to(missing)
    dangling = ctx.crma("store", "remove", str(root), "astronomy", name="remove-dangling")
    expect(dangling.rc == 2 and not missing.exists(), f"dangling link: exit {dangling.rc}, "
                                                      f"target created: {missing.exists()}")
    return f"exit 2: \"{done.brief()}\"; outside file unchanged; a dangling .lock link: exit 2, nothing created"


def case_sweep_spares_user_files(ctx: Ctx) -> str:
    root = ctx.copy_base()
    user = ["vault/keep.txt", "v2.bak/keep.txt", "backbone/vault/keep.txt", "backbone/v2.bak/keep.txt",
            "adapters/cooking/v1.old/keep.txt", "router/videos/keep.txt", "notes.txt"]
    own = ["backbone/v7/crma_backbone.safetensors", ".tmp-abc123/x", "adapters/cooking/.tmp-q1w2e3/x"]
    for rel in user + own:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")
    expect(done.rc == 0, f"crma store remove: exit {done.rc}: {done.brief()}")
    lost = [rel for rel in user if not (root / rel).is_file() or (root / rel).read_text() != "x"]
    expect(not lost, f"user files lost: {lost}")
    kept = [rel for rel in own if (root / rel).exists()]
    expect(not kept, f"crma's leftovers not swept: {kept}")
    return f"{len(user)} user files/folders kept (vault/, v2.bak/, ...); {len(own)} crma leftovers swept"


# ---- store cases: writers killed --------------------------------------------------------------------------------
def killed_add(ctx: Ctx, root: Path, at: str) -> str:
    """SIGKILL `crma add contracts` at `at` (seconds, 'training', or a hook point); then the store must
    verify and the next add must register."""
    before = (root / "manifest.json").read_bytes()
    pause = at if not at[0].isdigit() and at != "training" else None
    proc = ctx.start("killed", add_args(root, "contracts"), pause=pause)
    if pause:
        when = ctx.wait_output(proc, f"CRMA_STORE_PAUSED {pause}")
    elif at == "training":
        when = ctx.wait_output(proc, "crma add:") + 0.5
        time.sleep(0.5)
    else:
        time.sleep(float(at))
        when = float(at)
    expect(proc.popen.poll() is None, f"the add ended before it was killed: {proc.popen.returncode}")
    proc.kill()
    left = leftovers(root)
    expect((root / "manifest.json").read_bytes() == before, "the manifest changed")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    again = ctx.crma(*add_args(root, "contracts"), name="again")
    expect(again.rc == 0, f"the next add: exit {again.rc}: {again.brief()}")
    expect("contracts" in manifest(root)["domains"] and not leftovers(root), f"after the next add: leftovers "
                                                                            f"{leftovers(root)}")
    return (f"killed after {when:.1f} s; manifest unchanged; {len(left)} temp leftovers; verify 0; next add "
            f"registered contracts and swept them")


def case_kill_after_3s(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "3")


def case_kill_in_training(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "training")


def case_kill_before_version_rename(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "before-version-rename")


def case_kill_before_manifest_rename(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "before-manifest-rename")


def case_first_add_interrupted(ctx: Ctx) -> str:
    root = ctx.tmp / "store"
    args = add_args(root, "cooking", None, "--model", "tiny:llama")
    proc = ctx.start("killed", args, pause="before-manifest-rename")
    ctx.wait_output(proc, "CRMA_STORE_PAUSED before-manifest-rename")
    proc.kill()
    expect(not (root / "manifest.json").exists(), "a manifest.json exists after the kill")
    half = sorted(os.listdir(root))
    again = ctx.crma(*args, name="again")
    expect(again.rc == 0, f"the next add: exit {again.rc}: {again.brief()}")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    expect(not leftovers(root), f"leftovers: {leftovers(root)}")
    return f"killed before the manifest existed (folder held {half}); next add took the folder over; verify 0"


# ---- store cases: damage ---------------------------------------------------------------------------------------
def damaged_copy(ctx: Ctx) -> Path:
    root = ctx.copy_base()
    flip(root / "adapters" / "cooking" / "v1" / "adapter_model.safetensors")
    return root


def case_damaged_adapter_serve(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    srv = ctx.serve(root)
    health = srv.health()
    expect(health["status"] == "degraded" and list(health["unavailable"]) == ["cooking"],
           f"/health: status {health['status']}, unavailable {list(health['unavailable'])}")
    expect(str(root) not in json.dumps(health), "public /health shows the store path")
    models = [m["id"] for m in json.loads(srv.get("/v1/models")[2])["data"]]
    expect("cooking" not in models and "astronomy" in models, f"/v1/models: {models}")
    cooking, reply = srv.post("/v1/completions", {"model": "cooking", "prompt": "abc", "max_tokens": 2})
    expect(cooking in (404, 503), f"cooking got {cooking}")
    answers = {}
    for model in ("astronomy", "base"):
        status, r = srv.post("/v1/completions", {"model": model, "prompt": "The stars", "max_tokens": 3,
                                                 "temperature": 0})
        answers[model] = status
        expect(status == 200 and r["choices"][0]["text"], f"{model} got {status}")
    return (f"serve started; /health degraded, unavailable [cooking]; cooking -> {cooking} "
            f"({error_of(reply)[1][:60]}); astronomy, base -> 200; models {models}")


def case_damaged_adapter_verify_repair(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    verify = ctx.crma("store", "verify", str(root), name="verify")
    no_traceback(verify, "crma store verify")
    expect(verify.rc == 1 and "cooking" in verify.out and "sha256 mismatch" in verify.out,
           f"verify: exit {verify.rc}: {verify.brief()}")
    m = manifest(root)
    router = m["router"]["versions"][str(m["router"]["current"])]
    flip(root / next(f for f in router["files"] if f.endswith(".safetensors")))   # and a part it can rebuild
    repair = ctx.crma("store", "verify", str(root), "--repair", name="repair")
    no_traceback(repair, "crma store verify --repair")
    rebuilt = manifest(root)["router"]["current"]
    expect("rebuilt" in repair.out and rebuilt == m["router"]["current"] + 1,
           f"--repair: exit {repair.rc}, router v{rebuilt}: {short(repair.out, 300)}")
    expect("cooking" in repair.out and repair.rc == 1, f"--repair: exit {repair.rc}: {short(repair.out, 300)}")
    told = next((ln for ln in repair.out.splitlines() if ln.startswith("repair: cooking")), "")
    return (f"verify 1 names cooking (sha256 mismatch); --repair (router flipped too) rebuilt router v{rebuilt}, "
            f"exit 1: \"...{short(told[-90:], 95)}\"")


def case_damaged_adapter_eval(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    done = ctx.crma("eval", "--store", str(root), "--data", *[f"{d}={DEMO / d / 'holdout.jsonl'}"
                                                              for d in ("cooking", "astronomy")], name="eval")
    no_traceback(done, "crma eval")
    rows = {ln.split()[0]: ln for ln in done.out.splitlines() if ln.startswith(("cooking ", "astronomy "))}
    expect(done.rc == 1, f"crma eval: exit {done.rc}: {done.brief()}")
    expect("damaged" in rows.get("cooking", "") and "astronomy" in rows, f"rows: {rows}")
    loss = rows["astronomy"].split()[3]
    expect(loss.replace(".", "").isdigit(), f"astronomy row has no loss: {rows['astronomy']}")
    return f"exit 1; cooking row says damaged; astronomy evaluated (pinned loss {loss})"


def case_manifest_missing_key(ctx: Ctx) -> str:
    root = ctx.copy_base()
    m = manifest(root)
    del m["domains"]["cooking"]["current"]
    (root / "manifest.json").write_text(json.dumps(m))
    got = []
    for name, args in (("store list", ["store", "list", str(root)]), ("add", add_args(root, "contracts"))):
        done = ctx.crma(*args, name=name.replace(" ", "-"))
        no_traceback(done, f"crma {name}")
        expect(done.rc == 2 and "domains.cooking.current" in done.err, f"crma {name}: exit {done.rc}: {done.brief()}")
        expect("crma add:" not in done.out, "the add started training")
        got.append(f"{name} 2")
    return f"{', '.join(got)}: \"{done.brief()}\""


def case_manifest_truncated(ctx: Ctx) -> str:
    root = ctx.copy_base()
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    show = ctx.crma("store", "show", str(root), name="show")
    no_traceback(show, "crma store show")
    expect(show.rc == 2 and "manifest.json" in show.err, f"crma store show: exit {show.rc}: {show.brief()}")
    srv = LiveServer(ctx.tmp, root, [])
    ctx.servers.append(srv)
    served = srv.proc.wait(min(ctx.left(), 60))
    no_traceback(served, "crma serve")
    expect(served.rc != 0 and "manifest.json" in served.err, f"crma serve: exit {served.rc}: {served.brief()}")
    return f"store show 2: \"{show.brief()}\"; serve refused to start (exit {served.rc}), no traceback"


def case_read_only_store(ctx: Ctx) -> str:
    if os.geteuid() == 0:
        raise Skipped("running as root: chmod -R a-w does not stop root's writes (and this interpreter, under "
                      "/root, cannot run as another user)")
    root = ctx.copy_base()
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    try:
        show = ctx.crma("store", "show", str(root), name="show")
        expect(show.rc == 0, f"crma store show: exit {show.rc}: {show.brief()}")
        done = ctx.crma("eval", "--store", str(root), "--data", f"cooking={DEMO / 'cooking' / 'holdout.jsonl'}",
                        name="eval")
        expect(done.rc == 0, f"crma eval: exit {done.rc}: {done.brief()}")
        add = ctx.crma(*add_args(root, "contracts"), name="add")
        no_traceback(add, "crma add")
        expect(add.rc == 2 and "crma add:" not in add.out, f"crma add: exit {add.rc}: {add.brief()}")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
    return f"show 0, eval 0; add 2 before training: \"{add.brief()}\""
