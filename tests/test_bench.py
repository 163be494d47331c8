"""crma bench: the summary against a hand-computed example, and the smoke grid end to end (tiny:llama)."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from crma.bench.grid import (
    CPU,
    PAPER,
    REPO_CORPUS,
    SMOKE,
    domain_specs,
    estimate_left,
    merge_protocol,
    plan_grid,
)
from crma.bench.summary import fmt_stats, load_results, stats_by_seed, summarize
from crma.cli import main
from crma.config import ALL_CONDITIONS, CRMAConfig
from crma.data import read_texts

DOMAINS = ["a", "b", "c"]
BASE = [4.0, 4.0, 4.0]
TOP = [[2.0, 4.0, 4.0]]          # phase 0 row shared by every hand-made run (L[0][0] = 2.0)


def fake(condition, seed, L, own_final=None, seconds=100.0, tokens=1000, spectral=None):
    """A finished results.json with a known loss matrix. own_final = [(own, final), ...] per prior
    domain: per-passage losses right after the domain's phase and after the last phase."""
    T = len(L)
    own_final = own_final or [([1.0], [1.0])] * (T - 1)
    after = [[[1.0] for _ in range(T)] for _ in range(T)]
    for j, (own, final) in enumerate(own_final):
        after[j][j], after[T - 1][j] = own, final
    return {"model": "tiny:llama", "condition": condition, "seed": seed, "domains": DOMAINS, "finished": True,
            "base_loss": BASE, "loss_matrix": L, "passage_losses": {"base": [], "after_phase": after},
            "train_tokens": tokens, "train_seconds": seconds,
            "phases": [{"steps": 2}, {"steps": 2}, {"steps": 4}],
            "grad_norm": [{"peak": 3.0, "mean": 1.0}, {"peak": 5.0, "mean": 2.0}, {"peak": 1.0, "mean": 0.5}],
            "loss_curves": [[1.0], [1.0], [1.0]], "spectral": spectral,
            "config": {"train": {"max_passages": 10, "max_holdout": 5, "max_len": 32, "epochs": 1, "lr": 1e-3,
                                 "batch_size": 2}, "lora": {"r": 8}, "crma": {"rho": 0.1}}}


def spec(norm, bound, dev):
    step = {"norm_dev": dev, "sum_dev": 2 * dev, "alpha": bound, "bound": bound, "norm": norm}
    return {"steps": 8, "layers": 2, "rho": 0.1, "per_step": [dict(step, norm_dev=0.0), step]}


@pytest.fixture(scope="module")
def example():
    """Loss matrices chosen so every statistic can be worked out by hand (see test bodies)."""
    runs = [
        # naive: drift_a = (2.4-2)/2 = 20%, drift_b = (1.8-1.5)/1.5 = 20% -> 20; BWT = mean(-0.4, -0.3)
        fake("naive", 0, TOP + [[2.2, 1.5, 4.0], [2.4, 1.8, 1.0]],
             own_final=[([1.0, 2.0, 3.0], [1.0, 2.03, 2.9]), ([1.0, 1.0], [1.005, 1.5])]),   # 3 of 5 kept
        # naive: (2.6-2)/2 = 30%, (2.1-1.5)/1.5 = 40% -> 35
        fake("naive", 42, TOP + [[2.3, 1.5, 4.0], [2.6, 2.1, 1.0]],
             own_final=[([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]), ([1.0, 1.0], [2.0, 2.0])]),       # 0 of 5 kept
        fake("frozen", 0, TOP + [[2.0, 1.5, 4.0], [2.0, 1.5, 1.2]]),
        fake("frozen", 42, TOP + [[2.0, 1.5, 4.0], [2.0, 1.5, 1.2]]),
        # modular: (1.98-2)/2 = -1%, 0 -> -0.5 ; 0, (1.47-1.5)/1.5 = -2% -> -1.0
        fake("modular", 0, TOP + [[2.0, 1.5, 4.0], [1.98, 1.5, 1.0]], seconds=120.0,
             spectral=spec(1.0, 0.05, 3e-7)),
        fake("modular", 42, TOP + [[2.0, 1.5, 4.0], [2.0, 1.47, 1.0]], seconds=150.0,
             spectral=spec(1.01, 0.05, 1e-8)),                                    # ||M||_2 > 1: certificate fails
        {"model": "tiny:llama", "condition": "naive", "seed": 7, "domains": DOMAINS, "finished": False,
         "phases_done": 1, "loss_matrix": TOP, "base_loss": BASE},                # partial: listed, not used
    ]
    return summarize(runs)


def test_drift_statistics_by_hand(example):
    naive, frozen, modular = (example["conditions"][c] for c in ("naive", "frozen", "modular"))
    assert naive["drift"]["values"] == pytest.approx([20.0, 35.0])
    assert naive["drift"]["mean"] == pytest.approx(27.5)
    assert naive["drift"]["sd"] == pytest.approx(15 / math.sqrt(2))              # sample sd, n-1
    assert (naive["drift"]["min"], naive["drift"]["max"]) == pytest.approx((20.0, 35.0))
    assert modular["drift"]["mean"] == pytest.approx(-0.75)
    assert modular["drift"]["sd"] == pytest.approx(0.5 / math.sqrt(2))
    assert frozen["drift"]["values"] == [0.0, 0.0]
    assert naive["per_domain_drift"]["a"]["values"] == pytest.approx([20.0, 30.0])
    assert naive["per_domain_drift"]["b"]["values"] == pytest.approx([20.0, 40.0])
    assert set(naive["per_domain_drift"]) == {"a", "b"}                          # prior domains only
    assert naive["bwt"]["values"] == pytest.approx([-0.35, -0.6])
    assert naive["gain"]["a"]["mean"] == pytest.approx(50.0)                     # (4 - 2) / 4
    assert naive["gain"]["b"]["mean"] == pytest.approx(62.5)
    assert frozen["gain"]["c"]["mean"] == pytest.approx(70.0)                    # (4 - 1.2) / 4
    assert example["comparisons"]["naive_modular_disjoint"] is True
    assert example["n_finished"] == 6 and len(example["runs"]) == 7
    assert naive["seeds"] == [0, 42]                                             # the unfinished seed 7 is left out


def test_advantage_overhead_and_cost_by_hand(example):
    adv = example["comparisons"]["advantage_modular_over_frozen"]
    # prior: seed 0 mean(100*0.02/2, 0) = 0.5; seed 42 mean(0, 100*0.03/1.5) = 1.0
    assert adv["prior"]["values"] == pytest.approx([0.5, 1.0])
    assert adv["prior"]["mean"] == pytest.approx(0.75) and adv["prior"]["positive_every_seed"] is True
    # all: the last domain adds 100 * (1.2 - 1.0) / 1.2 = 16.667 at both seeds
    assert adv["all"]["values"] == pytest.approx([(1 + 0 + 50 / 3) / 3, (0 + 2 + 50 / 3) / 3])
    over = example["comparisons"]["crma_time_overhead_pct"]
    assert over["values"] == pytest.approx([20.0, 50.0])                         # 120/100 - 1, 150/100 - 1
    naive = example["conditions"]["naive"]
    assert naive["tokens_per_s"]["mean"] == pytest.approx(10.0)
    assert naive["grad_norm"]["max_peak"] == 5.0
    assert naive["grad_norm"]["mean"]["values"] == pytest.approx([1.0, 1.0])     # (2*1 + 2*2 + 4*0.5) / 8


def test_retention_wilson_and_spectral_by_hand(example):
    ret = example["conditions"]["naive"]["retention"]
    assert (ret["k"], ret["n"]) == (3, 10)                                        # 1.0<=1.01, 2.9<=3.03, 1.005<=1.01
    assert ret["wilson95"] == pytest.approx([0.1078, 0.6032], abs=1e-4)           # Wilson 3/10, z = 1.96
    seed0 = ret["per_seed"][0]
    assert (seed0["k"], seed0["n"]) == (3, 5)
    assert seed0["wilson95"] == pytest.approx([0.2307, 0.8824], abs=1e-4)
    frozen = example["conditions"]["frozen"]["retention"]
    assert (frozen["k"], frozen["n"]) == (4, 4)                                   # 1 passage x 2 domains x 2 seeds
    s = example["conditions"]["modular"]["spectral"]
    assert s["max_norm_dev"] == 3e-7 and s["max_sum_dev"] == 6e-7 and s["max_norm"] == 1.01
    assert s["certificate_ok"] is False                                           # seed 42 broke ||M||_2 <= 1
    assert [p["certificate_ok"] for p in s["per_seed"]] == [True, False]
    assert example["conditions"]["naive"]["spectral"] is None


def test_paper_comparison_rows(example):
    rows = {r["metric"]: r for r in example["paper_comparison"]}
    assert "+42.96" in rows["drift, naive"]["paper"] and "-15.46 points" in rows["drift, naive"]["sentence"]
    assert "do not overlap" in rows["drift, naive"]["sentence"]
    assert "exactly zero" in rows["drift, frozen"]["sentence"]
    assert "FAILED" in rows["max | ||M||_2 - 1 | over all logged steps and layers"]["sentence"]
    json.dumps(example, allow_nan=False)                                          # plain JSON, no NaN


def test_summarize_refuses_mixed_runs():
    a = fake("naive", 0, TOP + [[2.0, 1.5, 4.0], [2.0, 1.5, 1.2]])
    b = dict(fake("frozen", 0, TOP + [[2.0, 1.5, 4.0], [2.0, 1.5, 1.2]]), model="other")
    with pytest.raises(ValueError, match="disagree"):
        summarize([a, b])
    assert summarize([])["conditions"] == {}


def test_protocols_find_their_corpus_in_the_repository():
    """paper and cpu read the repository's cl5 corpus by default and it holds every passage they use; smoke
    reads the bundled demo data."""
    for protocol in (PAPER, CPU, SMOKE):
        specs = domain_specs(protocol, None)
        assert [s.name for s in specs] == list(protocol.domains)
        for spec in specs:
            assert len(read_texts(spec.train)) >= protocol.train_passages, (protocol.name, spec.name)
            assert len(read_texts(spec.holdout)) >= protocol.holdout_passages, (protocol.name, spec.name)
    assert Path(domain_specs(CPU, None)[0].train).parent.parent == REPO_CORPUS
    assert estimate_left({"naive": [10.0, 20.0]}, ["naive", "modular"]) == 30.0    # unknown: the overall mean
    assert estimate_left({}, ["naive"]) is None


@pytest.mark.slow                  # end to end, 40-70 s on 2 idle cores (tiny:llama)
def test_smoke_grid_resume_jobs_and_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--protocol", "smoke", "--out", str(out), "--seeds", "0", "--quiet"]) == 0
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert sorted(first) == [f"{c}-seed0" for c in sorted(ALL_CONDITIONS)]      # every condition, baselines too
    # --jobs 2: two single-threaded worker processes give bit-identical loss matrices to the one process above
    jobs = ["bench", "--protocol", "smoke", "--seeds", "0", "--conditions", "naive,modular"]
    assert main(jobs + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    assert "in 2 single-threaded processes" in capsys.readouterr().out
    for run in ("naive-seed0", "modular-seed0"):
        one, two = (json.loads((d / run / "results.json").read_text()) for d in (out, tmp_path / "two"))
        assert two["finished"] and two["loss_matrix"] == one["loss_matrix"]
        assert json.loads((tmp_path / "two" / run / "bench_run.json").read_text())["torch_threads"] == 1
    assert main(jobs + ["--out", str(tmp_path / "bad"), "--jobs", "0"]) == 2
    # more of the grid in a "second session" (naive and frozen at seed 42 too): finished runs are skipped,
    # not rewritten
    core = ["--conditions", "naive,frozen", "--seeds", "0,42"]
    assert main(["bench", "--protocol", "smoke", "--out", str(out), *core, "--resume", "--quiet"]) == 0
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert len(mtimes) == 8 and all(mtimes[k] == v for k, v in first.items())
    results = load_results(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summarize(results)))
    assert summary["n_finished"] == 8
    by = {(r["condition"], r["seed"]): r for r in results}
    for seed in (0, 42):
        assert by["frozen", seed]["drift_pct"] == 0.0
        # same data order and LoRA init in every condition: phase 0 is identical for naive and frozen
        # (its own adapter, same batches); naive's shared adapter then sees the same stream
        assert by["naive", seed]["loss_curves"][0] == by["frozen", seed]["loss_curves"][0]
        assert by["naive", seed]["loss_matrix"][0][0] == by["frozen", seed]["loss_matrix"][0][0]
        assert summary["conditions"]["naive"]["drift"]["values"][[0, 42].index(seed)] == \
            pytest.approx(by["naive", seed]["drift_pct"])
    # baselines share the data, order and LoRA init: with nothing to protect, replay or orthogonalise
    # yet, phase 0 of ewc and replay is naive's and olora's is frozen's, to the bit
    for cond, like in (("ewc", "naive"), ("replay", "naive"), ("olora", "frozen")):
        assert by[cond, 0]["loss_curves"][0] == by[like, 0]["loss_curves"][0]
        assert by[cond, 0]["loss_matrix"][0][0] == by[like, 0]["loss_matrix"][0][0]
        assert by[cond, 0]["storage"]["method"] == cond and "storage" not in by[like, 0]
    assert by["replay", 0]["phases"][1]["steps"] > by["naive", 0]["phases"][1]["steps"]   # + replayed
    assert set(summary["conditions"]) == {*ALL_CONDITIONS, "modular-pinned"}
    assert summary["conditions"]["modular"]["spectral"]["certificate_ok"] is True
    report = (out / "report.md").read_text()
    for png in ("drift", "spectral", "loss_curves", *(f"loss_matrix_{c}" for c in ALL_CONDITIONS)):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png}.png)" in report
    assert "Partial grid" not in report and "Learning advantage" in report
    assert "## What each condition costs and keeps" in report and "training passages kept as text" in report
    assert "drift, single-adapter continual-learning baselines" in report and "this grid has no baseline" not in report
    # refusing to overwrite finished runs, and to resume with other settings
    assert main(["bench", "--protocol", "smoke", "--out", str(out), "--quiet"]) == 2
    assert main(["bench", "--protocol", "smoke", "--out", str(out), "--resume", "--model", "tiny:gpt2"]) == 2
    # an unfinished run is redone by --resume; the finished ones are untouched
    path = out / "frozen-seed42" / "results.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), finished=False)))
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert main(["bench", "--protocol", "smoke", "--out", str(out), *core, "--resume", "--quiet"]) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert [k for k in after if after[k] != before[k]] == ["frozen-seed42"]
    assert json.loads(path.read_text())["finished"] is True
    # crma report recomputes the summary from the run folders alone
    (out / "summary.json").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summarize(load_results(out))))


def test_partial_grid_report_and_missing_corpus(tmp_path):
    out = tmp_path / "partial"
    (out / "naive-seed0").mkdir(parents=True)
    (out / "protocol.json").write_text(json.dumps({**SMOKE.to_dict(), "corpus": "demo", "command": "crma bench",
                                                   "grid": [["naive", 0], ["frozen", 0]]}))
    (out / "naive-seed0" / "results.json").write_text(json.dumps(fake("naive", 0, TOP + [[2.0, 1.5, 4.0],
                                                                                       [2.0, 1.5, 1.2]])))
    assert main(["report", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "1 of 2 runs finished" in report and "frozen-seed0" in report
    with pytest.raises(Exception, match="lacks files"):
        plan_grid(CPU, tmp_path / "x", corpus=tmp_path)


def test_fmt_stats_never_shows_a_zero_sd_for_one_seed():
    one, three = stats_by_seed([0], [9.5]), stats_by_seed([0, 42, 1234], [1.0, 2.0, 3.0])
    assert fmt_stats(one) == "+9.50% ± n/a (1 seed)"
    assert fmt_stats(three, full=True) == "+2.00% ± 1.00 [+1.00, +3.00] (n=3)"
    assert fmt_stats({"mean": 42.96, "sd": 5.5, "min": 38.1, "max": 49.0}, full=True, n=3).endswith("(n=3)")
    assert fmt_stats(None) == "n/a"


def test_protocol_json_keeps_every_invocation_of_a_split_grid(tmp_path, capsys):
    """Two sessions fill one folder (a seed each): protocol.json lists both commands and the union grid,
    and the second session's ETA already knows the first one's run times."""
    out = tmp_path / "bench"
    assert main(["bench", "--protocol", "smoke", "--out", str(out), "--seeds", "42", "--conditions", "frozen",
                 "--quiet"]) == 0
    assert main(["bench", "--protocol", "smoke", "--out", str(out), "--seeds", "0", "--conditions", "frozen"]) == 0
    assert "[bench 1/1] frozen seed 0 | elapsed 0:00:00 | ETA 0:00:" in capsys.readouterr().out
    proto = json.loads((out / "protocol.json").read_text())
    assert proto["grid"] == [["frozen", 0], ["frozen", 42]]
    assert [c.split("--seeds ")[1][:2] for c in proto["commands"]] == ["42", "0 "]
    report = (out / "report.md").read_text()
    assert all(c in report for c in proto["commands"]) and "Partial grid" not in report


def test_merge_protocol_starts_afresh_for_another_model_and_reads_the_old_single_command():
    new = {**SMOKE.to_dict(), "model": "tiny:llama", "corpus": "x", "grid": [["naive", 42]], "commands": ["b"],
           "crma": dataclasses.asdict(CRMAConfig())}
    old = {k: v for k, v in new.items() if k not in ("commands", "crma")} | {"grid": [["modular", 0]], "command": "a"}
    merged = merge_protocol(old, new)
    assert merged["grid"] == [["modular", 0], ["naive", 42]]      # seed order of the protocol, then conditions
    assert merged["commands"] == ["a", "b"]
    assert merge_protocol({**old, "model": "tiny:gpt2"}, new) == new
    assert merge_protocol({**old, "crma": {**new["crma"], "rho": 0.3}}, new) == new     # another ablation


def test_bench_compares_crma_settings_and_refuses_to_mix_them(tmp_path):
    """--crma-* changes every run's CRMA config and the report says so; resuming a folder made with
    other CRMA settings is an error, not a silent mix."""
    out = tmp_path / "rho"
    args = ["bench", "--protocol", "smoke", "--out", str(out), "--seeds", "0", "--conditions", "modular", "--quiet"]
    assert main(args + ["--crma-rho", "0.02"]) == 0
    res = json.loads((out / "modular-seed0" / "results.json").read_text())
    assert res["config"]["crma"]["rho"] == 0.02
    assert "rho = 0.02 (default 0.1)" in (out / "report.md").read_text()
    assert main(args + ["--resume"]) == 2          # default rho against a finished rho = 0.02 run
    # frozen has no backbone: a frozen run made under other CRMA settings is the same run, and is kept
    frozen = args[:-2] + ["frozen", "--quiet"]
    assert main(frozen) == 0
    mtime = (out / "frozen-seed0" / "results.json").stat().st_mtime_ns
    assert main(frozen + ["--crma-rho", "0.02", "--resume"]) == 0
    assert (out / "frozen-seed0" / "results.json").stat().st_mtime_ns == mtime
