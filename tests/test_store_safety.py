"""The store under careless and hostile use (issue 18, findings 2, 3, 5 and the store side of 7): two
concurrent writers, symbolic links planted inside a store, a first add killed mid-way, damaged manifests,
unwritable stores and a full disk. Tiny stores (tiny:llama, one epoch, 16 passages); three real processes
(two concurrent first adds, one SIGKILL), everything else in-process through `crma.cli.main`."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import crma.engine.add as add_module
from crma.cli import main
from crma.engine.live import LiveModel
from crma.store import Store, StoreError, sweep_orphans
from tests.conftest import write_cycle_domain
from tests.forked import Crma

FAST = ["--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "48", "--eval-batch-size", "8",
        "--min-gain", "-100"]                       # always registered: these tests are about the store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """--data arguments of three small domains."""
    root = tmp_path_factory.mktemp("data")
    return {name: f"{write_cycle_domain(root / f'{name}.jsonl', cycle, 16, seed)}:"
                  f"{write_cycle_domain(root / f'{name}_hold.jsonl', cycle, 4, seed + 10)}"
            for name, cycle, seed in (("up", "abcd", 1), ("down", "dcba", 2), ("mid", "acbd", 3))}


def add_args(root, domain: str, data: dict, *extra) -> list[str]:
    return ["add", "--store", str(root), "--domain", domain, "--data", data[domain], *FAST, *extra]


def add(root, domain: str, data: dict, *extra) -> int:
    """`crma add` in this process (a new store: tiny:llama)."""
    new = [] if (Path(root) / "manifest.json").exists() else ["--model", "tiny:llama"]
    return main(add_args(root, domain, data, *new, *extra))


@pytest.fixture(scope="module")
def up_store(data, tmp_path_factory) -> Path:
    """A modular tiny:llama store holding 'up' (copied by every test that writes)."""
    root = tmp_path_factory.mktemp("up") / "s"
    assert add(root, "up", data) == 0
    return root


def copy_of(store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "s"
    shutil.copytree(store, root, symlinks=True)
    return root


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (links not followed) with a file's bytes: a snapshot to compare."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".tmp-") or (p.name.startswith(".manifest.json.") and p.name.endswith(".tmp")))


def during_training(monkeypatch, other) -> None:
    """Run `other()` (another writer) while this process's next add trains: a deterministic race."""
    real, calls = add_module.train_domain, []

    def train_domain(*args, **kwargs):
        if not calls:
            calls.append(1)
            other()
        return real(*args, **kwargs)

    monkeypatch.setattr(add_module, "train_domain", train_domain)


# ---- finding 2: concurrent writers --------------------------------------------------------------------------
def test_add_that_trained_from_an_older_backbone_is_refused(up_store, data, tmp_path, monkeypatch, capsys):
    root = copy_of(up_store, tmp_path)
    during_training(monkeypatch, lambda: add(root, "mid", data))      # registers backbone v2 meanwhile
    capsys.readouterr()
    assert add(root, "down", data) == 2
    err = capsys.readouterr().err
    assert "the store changed while this job trained" in err and "newest backbone is now v2" in err
    assert "trained from v1" in err and "add mid" in err and "Nothing was written" in err
    store = Store(root)
    store.verify()
    assert store.domains() == ["up", "mid"]                            # nothing lost, nothing half-registered
    assert sorted(store.manifest["backbone"]["versions"]) == ["1", "2"]
    assert store.backbone_meta(2)["parent"] == 1 and store.backbone_meta(2)["trained_on"] == "mid"
    assert not (root / "adapters" / "down").exists() and not leftovers(root)
    monkeypatch.undo()
    assert add(root, "down", data) == 0                                # run again: it trains from v2
    assert Store(root).backbone_meta(3)["parent"] == 2


def test_frozen_store_keeps_concurrent_adds_of_other_domains_and_refuses_the_same_one(data, tmp_path, monkeypatch,
                                                                                    capsys):
    root = tmp_path / "f"
    assert add(root, "up", data, "--condition", "frozen") == 0
    during_training(monkeypatch, lambda: add(root, "mid", data))
    assert add(root, "down", data) == 0                                # nothing it trained from changed
    assert Store(root).domains() == ["up", "mid", "down"]
    assert Store(root).router().names == ["up", "mid", "down"]         # the router as it is now, plus down
    monkeypatch.undo()
    during_training(monkeypatch, lambda: add(root, "mid", data))
    capsys.readouterr()
    assert add(root, "mid", data) == 2                                 # the same domain registered meanwhile
    assert "domain 'mid' changed meanwhile (now v2)" in capsys.readouterr().err
    store = Store(root)
    store.verify()
    assert store.adapter_meta("mid")["version"] == 2 and sorted(store.manifest["adapters"]["mid"]) == ["1", "2"]


def _start(args: list[str], tmp_path: Path, name: str, pause: str, resume: Path | None = None) -> Crma:
    env = {"CRMA_STORE_PAUSE": pause} | ({"CRMA_STORE_RESUME": str(resume)} if resume is not None else {})
    return Crma(args, tmp_path / f"{name}.out", tmp_path / f"{name}.err", env)


def _wait_paused(procs: dict[str, Crma], point: str) -> None:
    for proc in procs.values():                                        # they run side by side meanwhile
        proc.wait_for(f"CRMA_STORE_PAUSED {point}")


def test_two_first_adds_with_different_models_one_registers_the_other_is_refused(data, tmp_path, capsys):
    root = tmp_path / "s"
    root.mkdir()
    runs = {"llama": (add_args(root, "up", data, "--model", "tiny:llama"), tmp_path / "go-llama"),
            "gpt2": (add_args(root, "down", data, "--model", "tiny:gpt2"), tmp_path / "go-gpt2")}
    procs = {name: _start(args, tmp_path, name, "before-lock", go) for name, (args, go) in runs.items()}
    try:
        _wait_paused(procs, "before-lock")                   # both trained for an empty folder
        runs["llama"][1].touch()
        assert procs["llama"].wait(timeout=120) == 0, (tmp_path / "llama.err").read_text()[-2000:]
        runs["gpt2"][1].touch()
        assert procs["gpt2"].wait(timeout=120) == 2
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    err = (tmp_path / "gpt2.err").read_text()
    assert "created meanwhile" in err and "model tiny:llama" in err and "model tiny:gpt2" in err
    assert "nothing was written" in err
    store = Store(root)
    store.verify()
    assert store.model_spec == "tiny:llama" and store.domains() == ["up"]
    assert sorted(os.listdir(root / "adapters")) == ["up"] and sorted(os.listdir(root / "backbone")) == ["v1"]
    LiveModel.open(store)                                              # the store serves
    capsys.readouterr()
    assert main(["store", "show", str(root)]) == 0 and "up" in capsys.readouterr().out


def test_two_first_adds_with_different_conditions_one_registers(data, tmp_path, monkeypatch, capsys):
    root = tmp_path / "s"
    during_training(monkeypatch, lambda: add(root, "up", data))       # a modular first add wins the race
    capsys.readouterr()
    assert add(root, "down", data, "--condition", "frozen") == 2
    err = capsys.readouterr().err
    assert "created meanwhile" in err and "condition modular" in err and "condition frozen" in err
    store = Store(root)
    store.verify()
    assert store.condition == "modular" and store.domains() == ["up"]
    assert all(store.adapter_meta(d)["backbone_version"] for d in store.domains())   # every adapter pinned
    assert sorted(os.listdir(root / "adapters")) == ["up"]
    LiveModel.open(store)
    assert main(["store", "show", str(root)]) == 0 and "up" in capsys.readouterr().out


def test_add_fails_before_training_when_another_writer_holds_the_lock(up_store, data, tmp_path, capsys):
    root = copy_of(up_store, tmp_path)
    before = (root / "manifest.json").read_bytes()
    capsys.readouterr()
    with Store.writer(root, "crma test holder"):
        assert add(root, "down", data) == 2
    out, err = capsys.readouterr()
    assert "another writer holds the store lock" in err and "crma test holder" in err
    assert "nothing was trained" in err and "crma add:" not in out    # refused before the model loaded
    assert (root / "manifest.json").read_bytes() == before


# ---- finding 3: symbolic links planted in the store ----------------------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """A user's folder outside the store, with names a careless sweep would take for its own."""
    folder = tmp_path / "outside"
    for rel, text in (("v1/adapter_model.safetensors", "weights"), ("videos/a.mp4", "film"), ("venv/x", "env"),
                      (".tmp-keep/notes", "keep"), ("v2/meta.json", "{}"), ("readme.txt", "mine")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def test_a_linked_adapter_folder_is_refused_and_nothing_outside_changes(up_store, data, outside, tmp_path, capsys):
    root = copy_of(up_store, tmp_path)
    (root / "adapters" / "x").symlink_to(outside)
    before, manifest = tree(outside), (root / "manifest.json").read_bytes()
    for args in (["store", "remove", str(root), "up"], ["store", "rollback", str(root), "up"],
                 add_args(root, "x", {"x": data["up"]}), add_args(root, "down", data)):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"{root}/adapters/x: is a symbolic link" in err and "remove the link" in err, (args, err)
    with pytest.raises(StoreError, match="adapters/x: is a symbolic link"):
        sweep_orphans(root, Store(root).manifest)
    assert tree(outside) == before                                     # nothing deleted, written or truncated
    assert (root / "manifest.json").read_bytes() == manifest
    (root / "adapters" / "x").unlink()
    assert main(["store", "remove", str(root), "up"]) == 0             # the link gone, writers work again


def test_a_linked_version_or_part_folder_is_never_written_through(up_store, data, outside, tmp_path, capsys):
    root = copy_of(up_store, tmp_path)
    before = tree(outside)
    shutil.rmtree(root / "router")
    (root / "router").symlink_to(outside)                              # where the next router version goes
    assert add(root, "down", data) == 2
    assert f"{root}/router: is a symbolic link" in capsys.readouterr().err
    assert tree(outside) == before
    with pytest.raises(StoreError, match="router/v1.*symbolic link|router: is a symbolic link"):
        Store(root).verify()                                           # and nothing is read through it


def test_a_linked_lock_file_is_not_followed(up_store, tmp_path, capsys):
    root = copy_of(up_store, tmp_path)
    secret, missing = tmp_path / "secret.txt", tmp_path / "created-by-nobody"
    secret.write_text("precious")
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(secret)
    assert main(["store", "remove", str(root), "up"]) == 2
    err = capsys.readouterr().err
    assert f"{root}/.lock: is a symbolic link" in err
    assert secret.read_text() == "precious"                            # not truncated
    (root / ".lock").unlink()
    (root / ".lock").symlink_to(missing)                               # a dangling link: nothing is created
    assert main(["store", "remove", str(root), "up"]) == 2 and not missing.exists()
    (root / ".lock").unlink()
    os.link(secret, root / ".lock")                                    # a hard link: not truncated either
    assert main(["store", "remove", str(root), "up"]) == 2
    assert "not crma's lock file" in capsys.readouterr().err and secret.read_text() == "precious"


def test_the_sweep_removes_only_crma_leftovers(up_store, tmp_path):
    root = copy_of(up_store, tmp_path)
    user = ["vault/keep.txt", "v2.bak/keep.txt", "backbone/vault/keep.txt", "backbone/v2.bak/keep.txt",
            "adapters/up/v1.old/keep.txt", "router/v0/keep.txt", "router/videos/keep.txt", "adapters/up/notes.txt"]
    crma_own = ["backbone/v7/crma_backbone.safetensors", "adapters/up/v3/meta.json", "router/v4/router.json",
                ".tmp-abc123/x", "adapters/up/.tmp-q1w2e3/x"]
    for rel in user + crma_own:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    assert main(["store", "remove", str(root), "up"]) == 0             # a writer: sweeps under its lock
    assert all((root / rel).read_text() == "x" for rel in user)
    assert not any((root / rel).parent.exists() for rel in crma_own)   # unreferenced versions, temp folders
    assert sorted(os.listdir(root / "backbone")) == ["v1", "v2.bak", "vault"]
    Store(root).verify()


# ---- finding 5: an interrupted first add, stale temp files ----------------------------------------------------
def test_a_stale_manifest_temp_file_is_swept_by_the_next_writer(up_store, tmp_path):
    root = copy_of(up_store, tmp_path)
    stale = root / ".manifest.json.k2j4h5g6.tmp"
    stale.write_text('{"half": ')
    keep = root / ".manifest.json.backup"                              # not a name crma's temp files have
    keep.write_text("mine")
    assert main(["store", "remove", str(root), "up"]) == 0
    assert not stale.exists() and keep.read_text() == "mine"


def test_a_first_add_killed_mid_way_leaves_a_folder_the_next_add_takes_over(data, tmp_path):
    root = tmp_path / "s"
    proc = _start(add_args(root, "up", data, "--model", "tiny:llama"), tmp_path, "first", "before-manifest-rename")
    try:
        _wait_paused({"first": proc}, "before-manifest-rename")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (root / "manifest.json").exists()
    assert (root / "adapters/up/v1").is_dir() and (root / "backbone/v1").is_dir()
    assert any(p.name.startswith(".manifest.json.") for p in root.iterdir())      # the temp manifest
    assert add(root, "up", data) == 0                                  # taken over, not "not empty"
    store = Store(root)
    store.verify()
    assert store.domains() == ["up"] and store.adapter_meta("up")["version"] == 1 and store.backbone_version("up") == 1
    assert not leftovers(root)
    (root / "manifest.json").unlink()                                  # a folder with a user's file is refused
    (tmp_path / "s" / "mine.txt").write_text("x")
    assert add(root, "down", data) == 2


# ---- finding 7 (store side): damaged manifests, unwritable stores, a full disk -------------------------------
@pytest.mark.parametrize("damage, key", [
    (lambda m: m["domains"]["up"].pop("current"), "domains.up.current"),
    (lambda m: m.pop("router"), "router"),
    (lambda m: m["backbone"].update(current="1"), "backbone.current"),
    (lambda m: m["adapters"]["up"]["1"].update(path="../../outside"), "adapters.up.1.path"),
    (lambda m: m["adapters"]["up"]["1"]["files"].update({"../../etc/passwd": "0" * 64}), "adapters.up.1.files"),
    (lambda m: m["backbone"].update(current=9), "backbone.current"),
])
def test_a_damaged_manifest_is_a_clear_error_naming_the_key(damage, key, up_store, data, tmp_path, capsys):
    root = copy_of(up_store, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    damage(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for args in (["store", "list", str(root)], add_args(root, "down", data)):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{root}/manifest.json: manifest key {key!r}" in err, err
    with pytest.raises(StoreError, match=f"manifest key '{key}'"):
        Store(root)


def test_an_unwritable_store_folder_fails_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(add_args(blocker / "store", "up", data, "--model", "tiny:llama")) == 2   # fails as root too
    out, err = capsys.readouterr()
    assert f"{blocker / 'store'}: cannot create the store folder (Not a directory)" in err
    assert "nothing was trained" in err and "crma add:" not in out
    assert main(add_args(blocker, "up", data, "--model", "tiny:llama")) == 2
    assert f"{blocker}: is a file, not a store folder" in capsys.readouterr().err


def test_a_full_disk_at_registration_is_a_clean_error_and_leaves_nothing(up_store, data, tmp_path, monkeypatch,
                                                                       capsys):
    root = copy_of(up_store, tmp_path)
    before, files = (root / "manifest.json").read_bytes(), tree(root)
    real = os.replace

    def replace(src, dst, *args, **kwargs):                            # the disk fills at the manifest's rename
        if str(dst).endswith("manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert add(root, "down", data) == 2
    err = capsys.readouterr().err
    assert f"{root}/manifest.json: No space left on device while writing to the store" in err
    assert "nothing was written" in err
    monkeypatch.undo()
    assert (root / "manifest.json").read_bytes() == before
    assert tree(root) == files                                         # no version folder, no temp file left
    Store(root).verify()
