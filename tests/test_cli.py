"""The commands that look at and use a store, through `crma.cli.main` on one tiny modular store built by
`crma run` once per session: `crma eval`, `crma generate`, `crma store list|show`, `crma route-eval --loss`."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from crma.cli import main
from crma.engine.evaluation import evaluate_store
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.store import Store
from tests.conftest import write_cycle_domain


@pytest.fixture(scope="session")
def cli_store(tmp_path_factory) -> dict:
    """Two conflicting cycle domains (up: abcd, down: dcba) through `crma run`, modular: backbone v1 under
    up, v2 under down. Returns the store folder and the data files."""
    root = tmp_path_factory.mktemp("cli")
    files = {"up": write_cycle_domain(root / "up.jsonl", "abcd", 16, 1),
             "up_hold": write_cycle_domain(root / "up_hold.jsonl", "abcd", 6, 2),
             "down": write_cycle_domain(root / "down.jsonl", "dcba", 16, 3),
             "down_hold": write_cycle_domain(root / "down_hold.jsonl", "dcba", 6, 4),
             "other": write_cycle_domain(root / "other_hold.jsonl", "abcd", 6, 9)}   # up-like, other passages
    store = root / "store"
    assert main(["run", "--model", "tiny:llama", "--domains", f"up={files['up']}:{files['up_hold']}",
                 f"down={files['down']}:{files['down_hold']}", "--condition", "modular", "--out", str(store),
                 "--epochs", "2", "--max-len", "48", "--lr", "1e-2", "--router-background", "none"]) == 0
    return {"store": store, **files}


def eval_rows(out: str) -> dict[str, list[str]]:
    """The rows of `crma eval`'s table, by domain: the cells split on whitespace (data column joined)."""
    lines = out.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("domain"))
    rows = {}
    for line in lines[head + 1:]:
        if line.startswith("change = "):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


# ---- crma eval -----------------------------------------------------------------------------------
def test_eval_pinned_equals_recorded_on_the_registered_holdout(cli_store, capsys):
    s = cli_store
    capsys.readouterr()
    assert main(["eval", "--store", str(s["store"]), "--data", f"up={s['up_hold']}", f"down={s['down_hold']}"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("domain"))
    assert head.split() == ["domain", "adapter", "recorded", "pinned", "change", "bb", "latest", "change", "bb", "data"]
    rows = eval_rows(out)
    assert list(rows) == ["up", "down"]                                # one row per domain, in the order given
    store = Store(s["store"])
    for d, pinned_bb in (("up", "v1"), ("down", "v2")):
        _, adapter, recorded, pinned, change, bb, latest, _, latest_bb, *data = rows[d]
        assert adapter == "v1" and (bb, latest_bb) == (pinned_bb, "v2")
        assert recorded == f"{store.adapter_meta(d)['holdout_loss']:.4f}"   # the manifest's number
        assert round(float(pinned), 4) == round(float(recorded), 4) and change == "+0.00%"
        assert " ".join(data) == "same as registered"
    # the same through the API, to the last bit: the pinned model is the registered one; latest is not
    ev = evaluate_store(LiveModel.open(store), {"up": str(s["up_hold"]), "down": str(s["down_hold"])}, progress=False)
    for row in ev:
        assert row.loss["pinned"] == row.recorded and row.same_data
    assert ev[0].loss["latest"] != ev[0].loss["pinned"]               # up on backbone v2 (trained on down)
    assert ev[1].loss["latest"] == ev[1].loss["pinned"]               # down is pinned to the newest


def test_eval_other_data_and_pinned_only(cli_store, capsys):
    s = cli_store
    capsys.readouterr()
    assert main(["eval", "--store", str(s["store"]), "--data", f"up={s['other']}", "--backbone", "pinned"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("domain"))
    assert head.split() == ["domain", "adapter", "recorded", "pinned", "change", "bb", "data"]
    assert "latest" not in out
    rows = eval_rows(out)
    assert list(rows) == ["up"]
    _, adapter, recorded, pinned, change, bb, *data = rows["up"]
    assert " ".join(data) == "OTHER data than registered" and bb == "v1"
    assert pinned != recorded and change != "+0.00%"                  # other passages, another loss


def test_eval_errors_name_the_domain_or_file(cli_store, capsys, tmp_path):
    s = cli_store
    root = str(s["store"])
    capsys.readouterr()
    assert main(["eval", "--store", root, "--data", f"legal={s['up_hold']}"]) == 2
    err = capsys.readouterr().err
    assert "'legal'" in err and "not in this store" in err and "up, down" in err
    missing = tmp_path / "nope.jsonl"
    assert main(["eval", "--store", root, "--data", f"up={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "crma eval: error" in err
    assert main(["eval", "--store", root, "--data", str(s["up_hold"])]) == 2
    assert "NAME=HOLDOUT" in capsys.readouterr().err


# ---- crma generate -------------------------------------------------------------------------------
def test_generate_greedy_is_repeatable_and_names_what_served(cli_store, capsys):
    root = str(cli_store["store"])
    args = ["generate", "--store", root, "--domain", "up", "--temperature", "0", "--max-new-tokens", "8",
            "--raw", "abcd"]
    capsys.readouterr()
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    again = capsys.readouterr()
    assert first.out == again.out
    want = generate(LiveModel.open(Store(root)), "abcd", domain="up", temperature=0, max_new_tokens=8, raw=True)
    assert first.out == want.text + "\n" and want.text
    assert "[router:" not in first.err                                 # a domain given: no routing
    assert f"[{want.new_tokens} tokens in " in first.err
    assert "up adapter v1, backbone v1 (pinned)]" in first.err
    assert main(["generate", "--store", root, "--domain", "down", "--temperature", "0", "--max-new-tokens", "2",
                 "--raw", "dcba"]) == 0
    assert "down adapter v1, backbone v2 (pinned)]" in capsys.readouterr().err
    assert main([*args[:-1], "--backbone", "latest", "abcd"]) == 0
    assert "up adapter v1, backbone v2 (latest)]" in capsys.readouterr().err


def test_generate_auto_prints_the_router_line(cli_store, capsys):
    s = cli_store
    prompt = json.loads(Path(s["down_hold"]).read_text().splitlines()[0])["text"]
    capsys.readouterr()
    assert main(["generate", "--store", str(s["store"]), "--domain", "auto", "--temperature", "0",
                 "--max-new-tokens", "4", "--raw", prompt]) == 0
    err = capsys.readouterr().err
    line = re.search(r"^\[router: (\S+) \(confidence ([0-9.]+)(, runner-up (\S+))?\)\]$", err, re.M)
    assert line, err
    domain = line.group(1)
    assert domain == "down" and 0 < float(line.group(2)) <= 1 and line.group(4) == "up"
    assert "down adapter v1, backbone v2 (pinned)]" in err           # the summary names the routed domain


def test_generate_unknown_domain_is_refused(cli_store, capsys):
    capsys.readouterr()
    assert main(["generate", "--store", str(cli_store["store"]), "--domain", "legal", "--raw", "abcd"]) == 2
    captured = capsys.readouterr()
    assert "crma generate: error" in captured.err and "'legal'" in captured.err and captured.out == ""


# ---- crma store list / show ----------------------------------------------------------------------
def store_table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("domain"))
    rows = {}
    for line in lines[head + 1:]:
        if not line or line.startswith(("history:", "removed:", " ")):
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_store_list_and_show(cli_store, capsys):
    root = str(cli_store["store"])
    store = Store(root)
    capsys.readouterr()
    assert main(["store", "list", root]) == 0
    out = capsys.readouterr().out
    assert "modular on tiny:llama" in out and "backbone: v2 current, 2 versions" in out and "router: v2" in out
    rows = store_table(out)
    assert list(rows) == ["up", "down"]
    for d, bb in (("up", "v1"), ("down", "v2")):
        _, serving, backbone, holdout, gain, versions = rows[d]
        assert (serving, backbone, versions) == ("v1", bb, "*v1")
        assert holdout == f"{store.adapter_meta(d)['holdout_loss']:.4f}"
        assert float(gain.rstrip("%")) == pytest.approx(store.adapter_meta(d)["gain_pct"], abs=0.006)
        assert float(gain.rstrip("%")) > 0
    assert "history:" not in out

    assert main(["store", "show", root]) == 0
    out = capsys.readouterr().out
    assert store_table(out) == rows
    history = out.split("history:\n", 1)[1].splitlines()
    assert [line.split()[1:] for line in history] == [["add", "up", "v1"], ["add", "down", "v1"]]

    for d, bb in (("up", 1), ("down", 2)):
        assert main(["store", "show", root, d]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["domain"] == d and shown["adapter"] == d and shown["current"] == 1
        assert shown["status"] == "active" and list(shown["versions"]) == ["1"]
        v1 = shown["versions"]["1"]
        assert v1["backbone_version"] == bb and v1["domain"] == d
        assert v1["holdout_loss"] == store.adapter_meta(d)["holdout_loss"]
    assert main(["store", "show", root, "legal"]) == 2
    assert "no domain 'legal'" in capsys.readouterr().err


def test_store_commands_refuse_a_folder_that_is_not_a_store(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    for action in ("list", "show"):
        assert main(["store", action, str(empty)]) == 2
        assert "not a crma store" in capsys.readouterr().err
    assert main(["store", "list", str(tmp_path / "missing")]) == 2
    assert "no such store directory" in capsys.readouterr().err
    (empty / "manifest.json").write_text('{"format": "something-else"}')
    assert main(["store", "show", str(empty)]) == 2
    assert "not a crma store manifest" in capsys.readouterr().err


# ---- crma route-eval --loss ----------------------------------------------------------------------
def test_route_eval_loss_routed_vs_oracle(cli_store, tmp_path, capsys):
    s = cli_store
    corpus = tmp_path / "corpus"
    for d in ("up", "down"):
        (corpus / d).mkdir(parents=True)
        shutil.copy(s[f"{d}_hold"], corpus / d / "holdout.jsonl")     # the registered holdout passages
        shutil.copy(s[f"{d}_hold"], corpus / d / "queries.jsonl")
    write_cycle_domain(corpus / "zig" / "queries.jsonl", "xyzw", 4, 5)  # a domain the router lacks
    report_file = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["route-eval", "--store", str(s["store"]), "--corpus", str(corpus), "--loss", "--n-random", "0",
                 "--no-builtin-ood", "--out", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "holdout loss, routed vs oracle adapters:" in out and f"wrote {report_file}" in out
    report = json.loads(report_file.read_text())
    assert report["domains"] == ["up", "down"]
    assert list(report["routing"]["ood"]) == ["untrained:zig"] and report["routing"]["ood"]["untrained:zig"]["n"] == 4
    loss = report["loss"]
    assert set(loss["per_domain"]) == {"up", "down"}
    store = Store(s["store"])
    for d, v in loss["per_domain"].items():
        held = store.adapter_meta(d)["data"]["holdout"]
        assert v["n"] == held["passages"] == 6 - len(held["duplicates_removed"]) and 0 <= v["misrouted"] <= v["n"]
        assert v["oracle_loss"] == store.adapter_meta(d)["holdout_loss"]   # oracle = how the store serves d
        assert v["routed_loss"] >= 0
        assert v["gap_pct"] == pytest.approx(100 * (v["routed_loss"] - v["oracle_loss"]) / v["oracle_loss"])
        if v["misrouted"] == 0:
            assert v["routed_loss"] == v["oracle_loss"] and v["gap_pct"] == 0.0
        else:
            assert v["routed_loss"] != v["oracle_loss"]
        assert f"({v['misrouted']}/{v['n']} misrouted)" in out
    assert any(v["misrouted"] == 0 for v in loss["per_domain"].values())
    if all(v["misrouted"] == 0 for v in loss["per_domain"].values()):
        assert loss["gap_pct"] == 0.0
    gap = next(t for t in report["targets"] if t["name"] == "routed_loss_gap_pct")
    assert gap["value"] == loss["gap_pct"] and gap["pass"] == (loss["gap_pct"] <= 1.0)


def test_route_eval_loss_needs_a_corpus(cli_store, tmp_path, capsys):
    s = cli_store
    capsys.readouterr()
    assert main(["route-eval", "--store", str(s["store"]), "--loss"]) == 2
    assert "--corpus" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert main(["route-eval", "--store", str(s["store"]), "--loss", "--queries", f"up={s['up_hold']}",
                 "--n-random", "0", "--no-builtin-ood", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--loss needs --store and --corpus" in err and not out.exists()
