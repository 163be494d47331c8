"""A store written by the previous release (tests/fixtures/store-0.1.0: `crma run` of tiny:llama, modular,
cooking then astronomy from crma/demo_data, --max-len 48, router encoder `base`) loads, evaluates, generates,
serves and takes a new domain with today's code. Every test works on a copy; the fixture is never written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crma.cli import main
from crma.engine.evaluation import evaluate_store
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.store import Store
from tests.test_serve import client, serving

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0"
DEMO = Path(__file__).resolve().parents[1] / "crma" / "demo_data"
HOLDOUT = {d: str(DEMO / d / "holdout.jsonl") for d in ("cooking", "astronomy")}
PROMPT = "How long should I knead bread dough?"
OLD_LOSSES = {"cooking": 5.2907, "astronomy": 5.2682}       # what the 0.1.0 `crma eval` printed


def copy_fixture(dest: Path) -> Path:
    root = dest / "store-0.1.0"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.fixture(scope="module")
def old_store(tmp_path_factory) -> Path:
    """A copy of the fixture for the tests that only read it."""
    return copy_fixture(tmp_path_factory.mktemp("compat"))


def eval_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("domain"))
    rows = {}
    for line in lines[head + 1:]:
        if line.startswith("change = "):
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_fixture_is_a_0_1_0_store():
    store = Store(FIXTURE)
    assert store.manifest["crma_version"] == "0.1.0" and store.manifest["settings"]["router"]["encoder"] == "base"


def test_old_store_shows_its_domains(old_store, capsys):
    capsys.readouterr()
    assert main(["store", "show", str(old_store)]) == 0
    out = capsys.readouterr().out
    assert "modular on tiny:llama" in out and "backbone: v2 current, 2 versions" in out
    table = [line.split() for line in out.split("history:")[0].splitlines()]
    rows = {cells[0]: cells for cells in table if cells and cells[0] in ("cooking", "astronomy")}
    assert rows["cooking"][1:3] == ["v1", "v1"] and rows["astronomy"][1:3] == ["v1", "v2"]
    assert [line.split()[1:] for line in out.split("history:\n", 1)[1].splitlines()] == \
        [["add", "cooking", "v1"], ["add", "astronomy", "v1"]]
    Store(old_store).verify()                                          # every checksum still matches


def test_old_store_evals_to_the_recorded_losses(old_store, capsys):
    store = Store(old_store)
    recorded = {d: store.adapter_meta(d)["holdout_loss"] for d in OLD_LOSSES}
    assert {d: round(v, 4) for d, v in recorded.items()} == OLD_LOSSES
    capsys.readouterr()
    assert main(["eval", "--store", str(old_store), "--data", *(f"{d}={p}" for d, p in HOLDOUT.items())]) == 0
    rows = eval_rows(capsys.readouterr().out)
    assert list(rows) == ["cooking", "astronomy"]
    for d, bb in (("cooking", "v1"), ("astronomy", "v2")):
        _, adapter, rec, pinned, change, pinned_bb, *_ = rows[d]
        assert adapter == "v1" and pinned_bb == bb
        assert rec == pinned == f"{OLD_LOSSES[d]:.4f}" == f"{recorded[d]:.4f}" and change == "+0.00%"
        assert rows[d][-3:] == ["same", "as", "registered"]


def test_old_store_generates_routed_to_cooking(old_store, capsys):
    capsys.readouterr()
    assert main(["generate", "--store", str(old_store), "--temperature", "0", "--max-new-tokens", "8", PROMPT]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("[router: cooking (confidence ")
    assert "cooking adapter v1, backbone v1 (pinned)]" in captured.err
    want = generate(LiveModel.open(Store(old_store)), PROMPT, temperature=0, max_new_tokens=8)
    assert want.domain == "cooking" and want.text and captured.out == want.text + "\n"


def test_old_store_serves(old_store):
    prompt = PROMPT
    want = generate(LiveModel.open(Store(old_store)), prompt, domain="cooking", temperature=0, max_new_tokens=4,
                    raw=True)
    with serving(old_store, max_batch=4) as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list()] == ["cooking", "astronomy", "auto", "base"]
        resp = c.completions.create(model="cooking", prompt=prompt, max_tokens=4, temperature=0)
        assert resp.choices[0].text == want.text
        info = resp.crma
        assert info["domain"] == "cooking" and info["adapter"] == "cooking@v1" and info["backbone_version"] == 1


def test_add_onto_the_old_store_leaves_old_domains_unchanged(tmp_path, capsys):
    root = copy_fixture(tmp_path)
    before = evaluate_store(LiveModel.open(Store(root)), HOLDOUT, ("pinned",), progress=False)
    assert main(["add", "--store", str(root), "--domain", "contracts", "--data",
                 f"{DEMO / 'contracts' / 'train.jsonl'}:{DEMO / 'contracts' / 'holdout.jsonl'}",
                 "--epochs", "1", "--lr", "1e-2", "--max-len", "48", "--max-passages", "12"]) == 0
    store = Store(root)
    store.verify()
    assert store.domains() == ["cooking", "astronomy", "contracts"]
    meta = store.adapter_meta("contracts")
    assert meta["backbone_version"] == 3 and meta["router_version"] == 3 and meta["phase"] == 2
    assert store.router().names == ["cooking", "astronomy", "contracts"]
    assert store.router().cfg.encoder == "base"                        # the store's router settings kept
    assert store.backbone_version("cooking") == 1 and store.backbone_version("astronomy") == 2
    after = evaluate_store(LiveModel.open(store), HOLDOUT, ("pinned",), progress=False)
    assert [r.loss["pinned"] for r in after] == [r.loss["pinned"] for r in before]   # to the last bit
    assert [round(r.loss["pinned"], 4) for r in after] == list(OLD_LOSSES.values())
    capsys.readouterr()
    assert main(["eval", "--store", str(root), "--data", *(f"{d}={p}" for d, p in HOLDOUT.items()),
                 "--backbone", "pinned"]) == 0
    rows = eval_rows(capsys.readouterr().out)
    assert [rows[d][3] for d in OLD_LOSSES] == [f"{v:.4f}" for v in OLD_LOSSES.values()]
    assert (FIXTURE / "manifest.json").read_bytes() != (root / "manifest.json").read_bytes()
    assert not (FIXTURE / "adapters" / "contracts").exists()
