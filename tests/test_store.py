"""The model store on a tiny real model: run == successive adds, pinned drift 0, crash safety, checksums,
names, the writer lock, rollback/remove, the validation gate, generation."""
import os
import shutil
import time

import pytest
import torch

from crma.baselines import make_method
from crma.cli import main
from crma.config import ConfigError, DomainSpec, TrainConfig
from crma.engine.add import AddSettings, load_spec
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.engine.loss import mean_loss
from crma.engine.run import evaluate_row
from crma.routing import route_texts
from crma.store import Store, StoreError, StoreLocked
from tests.forked import Crma

TRAIN = ["--model", "tiny:llama", "--epochs", "3", "--lr", "1e-2", "--batch-size", "8", "--max-len", "64",
         "--eval-batch-size", "8"]
SETTINGS = AddSettings(train=TrainConfig(epochs=3, lr=1e-2, batch_size=8, max_len=64, eval_batch_size=8))


def add(store, spec: DomainSpec, *extra) -> int:
    return main(["add", "--store", str(store), "--domain", spec.name, "--data", f"{spec.train}:{spec.holdout}",
                 *TRAIN, *extra])


def matrix_row(store, domains, phase, backbone="latest"):
    live = LiveModel.open(Store(store))
    data = [load_spec(s, live.tokenizer, SETTINGS.train) for s in domains]
    rows = evaluate_row(live, data, phase, backbone, SETTINGS, False, make_method(live.condition))
    return [mean_loss(cell) for cell in rows]


@pytest.fixture(scope="module")
def added_store(conflicting_domains, tmp_path_factory):
    """The conflicting domains added one `crma add` at a time, with the loss rows measured after each."""
    root = tmp_path_factory.mktemp("store") / "s"
    rows = []
    for phase, spec in enumerate(conflicting_domains):
        assert add(root, spec) == 0
        rows.append(matrix_row(root, conflicting_domains, phase))
    return root, rows


def test_run_equals_successive_adds_to_the_last_bit(added_store, conflict_runs):
    root, rows = added_store
    run = conflict_runs["modular"]
    assert rows == run["loss_matrix"]                                  # exact float equality, every cell
    store = Store(root)
    assert [store.adapter_meta(d)["holdout_loss"] for d in ("up", "down")] == \
        [run["loss_matrix"][0][0], run["loss_matrix"][1][1]]
    ran = Store(run["_dir"])                                           # a run is a store too
    assert ran.domains() == store.domains() == ["up", "down"]
    for d in ("up", "down"):                                           # bit-identical weights on disk
        weights = [{k.rsplit("/", 1)[1]: v for k, v in s.adapter_meta(d)["files"].items() if k.endswith(".safetensors")}
                   for s in (ran, store)]
        assert weights[0] == weights[1]


def test_pinned_drift_is_exactly_zero_and_latest_is_not(conflict_runs, added_store, conflicting_domains):
    res = conflict_runs["modular"]
    assert res["drift_pct_pinned"] == 0.0
    assert res["loss_matrix_pinned"][1][0] == res["loss_matrix_pinned"][0][0] == res["loss_matrix"][0][0]
    assert res["loss_matrix"][1][0] != res["loss_matrix"][0][0]        # the backbone moved under 'up'
    assert res["backbone_versions"] == [1, 2]
    root, _ = added_store
    assert matrix_row(root, conflicting_domains, 1, "pinned")[0] == res["loss_matrix"][0][0]
    store = Store(root)
    assert store.backbone_version("up", "pinned") == 1 and store.backbone_version("up", "latest") == 2


def test_store_layout_and_records(added_store):
    root, _ = added_store
    store = Store(root)
    store.verify()
    meta = store.adapter_meta("down")
    assert meta["backbone_version"] == 2 and meta["phase"] == 1 and meta["router_version"] == 2
    assert meta["data"]["train"]["passages"] == 40 and len(meta["data"]["train"]["sha256"]) == 64
    assert meta["base_loss"] > meta["holdout_loss"] and meta["gain_pct"] > 0
    assert (root / "adapters/down/v1/adapter_model.safetensors").exists()
    assert (root / "backbone/v2/crma_backbone.safetensors").exists()
    text = "".join(p.read_text(errors="replace") for p in root.rglob("*.json"))
    # no training text anywhere (16 characters of a passage: 4 would turn up in hex digests by chance)
    assert "abcd" * 4 not in text and "dcba" * 4 not in text


def test_corrupted_weight_file_is_refused_with_its_name(added_store, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(added_store[0], root)
    target = root / "adapters/up/v1/adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="adapters/up/v1/adapter_model.safetensors: sha256 mismatch"):
        Store(root).verify()
    live = LiveModel.open(Store(root))
    with pytest.raises(StoreError, match="adapter_model.safetensors"):
        with live.using("up"):
            pass
    with live.using("down"):                                           # the intact adapter still serves
        pass


@pytest.mark.parametrize("name", ["../evil", "Medical", "a.b", "base", "auto", "x" * 65, "/tmp/x", "-lead"])
def test_bad_domain_names_are_refused(name, tmp_path, capsys, conflicting_domains):
    spec = conflicting_domains[0]
    rc = main(["add", "--store", str(tmp_path / "s"), f"--domain={name}", "--data", str(spec.train), *TRAIN])
    assert rc == 2
    assert "domain name" in capsys.readouterr().err
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(ConfigError):
        DomainSpec(name, spec.train)


def test_second_writer_gets_a_clear_error(added_store, tmp_path):
    root, _ = added_store
    before = (root / "manifest.json").read_bytes()
    with Store.writer(root, "crma test holder"):
        with pytest.raises(StoreLocked, match=f"pid.*{os.getpid()}.*crma test holder"):
            with Store.writer(root, "second"):
                pass
        second = Crma(["store", "remove", str(root), "up"], tmp_path / "out", tmp_path / "err")
        assert second.wait(timeout=120) == 2 and "another writer holds the store lock" in second.output()[1]
        assert Store(root).domains() == ["up", "down"]                 # readers are not blocked
    assert (root / "manifest.json").read_bytes() == before


def _add_and_kill(root, spec, point: str | None, tmp_path) -> None:
    """Start `crma add` in a second process and SIGKILL it at `point` (None: during training)."""
    args = ["add", "--store", str(root), "--domain", spec.name, "--data", f"{spec.train}:{spec.holdout}", *TRAIN]
    if point is None:
        args[args.index("--epochs") + 1] = "200"
    proc = Crma(args, tmp_path / "add.out", tmp_path / "add.err", {"CRMA_STORE_PAUSE": point or ""})
    proc.wait_for(*((f"CRMA_STORE_PAUSED {point}", 0) if point else ("train down", 1)))
    if point is None:
        time.sleep(0.5)                                                # a few optimizer steps in
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def one_domain_store(conflicting_domains, tmp_path_factory):
    """A store holding 'up' (one `crma add`), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("one") / "s"
    assert add(root, conflicting_domains[0]) == 0
    return root


@pytest.mark.parametrize("point", [None, "before-version-rename", "before-manifest-rename"])
def test_sigkill_during_add_leaves_the_previous_store_intact(point, conflicting_domains, one_domain_store, tmp_path):
    root = tmp_path / "s"
    up, down = conflicting_domains
    shutil.copytree(one_domain_store, root)
    before = (root / "manifest.json").read_bytes()
    recorded = Store(root).adapter_meta("up")["holdout_loss"]
    _add_and_kill(root, down, point, tmp_path)
    assert (root / "manifest.json").read_bytes() == before
    store = Store(root)
    store.verify()
    assert store.domains() == ["up"]
    assert matrix_row(root, [up], 0, "pinned")[0] == recorded
    assert add(root, down) == 0                                        # the lock died with the process
    store = Store(root)
    assert store.domains() == ["up", "down"] and store.adapter_meta("down")["version"] == 1
    assert store.backbone_version("down") == 2                         # orphans swept, no gaps
    assert not list(root.rglob(".tmp-*"))


def test_rollback_and_remove_change_only_manifest_and_router(conflicting_domains, tmp_path, capsys):
    root = tmp_path / "s"
    up, down = conflicting_domains
    assert add(root, up) == 0 and add(root, down) == 0
    assert add(root, up) == 0                                          # new data for 'up': version 2
    store = Store(root)
    assert store.adapter_meta("up")["version"] == 2 and store.adapter_meta("up")["backbone_version"] == 3
    r2 = store.router()
    assert r2.calibration["up"]["n_train"] == 2 * store.router(1).calibration["up"]["n_train"]  # merged
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and "router" not in str(p))
    assert main(["store", "rollback", str(root), "up"]) == 0
    store = Store(root)
    assert store.adapter_meta("up")["version"] == 1 and store.backbone_version("up") == 1
    assert store.backbone_version(None) == 3                           # the backbone keeps what it learned
    router = store.router()
    assert torch.equal(router.t["mean"][router.names.index("up")],
                       store.router(1).t["mean"][0])             # up's statistics as registered in v1
    assert main(["store", "remove", str(root), "down"]) == 0
    store = Store(root)
    assert store.domains() == ["up"] and "down" not in store.router().names
    after = sorted(str(p) for p in root.rglob("*") if p.is_file() and "router" not in str(p))
    assert after == files                                              # no weight file touched or removed
    assert main(["store", "rollback", str(root), "up", "--to", "v9"]) == 2
    assert "no version v9" in capsys.readouterr().err
    store.verify()


def test_validation_gate_registers_nothing(added_store, conflicting_domains, tmp_path, capsys):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(added_store[0], root)
    before = (root / "manifest.json").read_bytes()
    assert add(root, conflicting_domains[0], "--min-gain", "1000") == 1
    assert "below --min-gain 1000%; the store is unchanged" in capsys.readouterr().out
    assert (root / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (root / "adapters/up").iterdir()) == ["v1"]


def test_run_refuses_a_folder_holding_something_else(conflicting_domains, tmp_path, capsys):
    from crma.engine.run import continual_run
    from tests.conftest import tiny_run_config
    out = tmp_path / "run"
    continual_run(tiny_run_config(conflicting_domains[:1], out, "modular", epochs=1), progress=False)
    args = ["run", "--model", "tiny:llama", "--domains", f"up={conflicting_domains[0].train}",
            "--condition", "frozen", "--out", str(out), "--epochs", "1", "--max-len", "64"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert Store(out).condition == "frozen" and not (out / "backbone").exists()   # no stale backbone


def test_generate_greedy_is_deterministic_and_streams(added_store):
    live = LiveModel.open(Store(added_store[0]))
    pieces = []
    first = generate(live, "abcdabcd", domain="up", temperature=0, max_new_tokens=12, raw=True, on_text=pieces.append)
    again = generate(LiveModel.open(Store(added_store[0])), "abcdabcd", domain="up", temperature=0,
                     max_new_tokens=12, raw=True)
    assert first.text == again.text and "".join(pieces) == first.text and first.new_tokens == 12
    assert first.domain == "up" and first.adapter_version == 1 and first.backbone_version == 1
    latest = generate(live, "abcdabcd", domain="up", backbone="latest", temperature=0, max_new_tokens=12, raw=True)
    assert latest.backbone_version == 2
    auto = generate(live, "dcbadcbadcba", temperature=0.8, seed=3, max_new_tokens=6, raw=True)
    decision = route_texts(live.store.router(), live.model, live.tokenizer, ["dcbadcbadcba"])[0]
    assert (auto.domain, auto.confidence) == (decision.domain, decision.confidence)   # the router's own choice
    base = generate(live, "abcd", domain="base", temperature=0, max_new_tokens=4, raw=True)
    assert base.adapter_version is None
    with pytest.raises(StoreError, match="not in this store"):
        generate(live, "x", domain="legal")


@pytest.mark.slow                  # end to end, 40-70 s on 2 idle cores (tiny:llama)
def test_demo_builds_a_store_answers_and_prints_pinned_and_latest(tmp_path, capsys):
    from crma.config import CRMAConfig, LoraSettings
    from crma.demo import DEMO_QUESTIONS, run_demo
    # max_len in bytes (the byte tokenizer): the longest support answer fits
    train = TrainConfig(epochs=1, lr=1e-2, batch_size=8, max_len=400, max_passages=8, max_holdout=4)
    results = run_demo(tmp_path / "demo", "tiny:llama", ["naive", "modular"], 0, train, LoraSettings(),
                       CRMAConfig(), max_new_tokens=4)
    out = capsys.readouterr().out
    assert Store(tmp_path / "demo" / "modular").domains() == ["cooking", "astronomy", "contracts", "support"]
    assert out.count("[router: ") == len(DEMO_QUESTIONS) and "modular pinned" in out and "modular latest" in out
    assert "nan" not in out and results["modular"]["drift_pct_pinned"] == 0.0
    run_demo(tmp_path / "demo", "tiny:llama", ["modular"], 0, train, LoraSettings(), CRMAConfig(),
             questions=())                                             # a second demo replaces the first
