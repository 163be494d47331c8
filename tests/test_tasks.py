"""Task scoring: the metrics against hand-computed values, task files and their errors, multiple choice on a
tiny model that learned the right choices, recorded scores that a pinned store keeps, and the task gate."""
from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from crma.bench.report import _save
from crma.bench.tasks import task_lines, task_plot, task_summary
from crma.cli import main
from crma.config import ConfigError
from crma.data import DataError, Example, prompt_ids
from crma.engine.add import task_gate
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.engine.loss import passage_losses
from crma.engine.tasks import TaskSet, _one_item, check_sharding, greedy_answers, parse_min_score, score_tasks
from crma.method.models import load_model
from crma.store import Store
from crma.tasks import (
    CHOICE,
    FREE,
    average_accuracy,
    backward_transfer,
    choice_picks,
    exact_match,
    forward_transfer,
    normalise,
    read_tasks,
    rouge_l,
    seed_interval,
    token_f1,
)
from tests.conftest import write_cycle_domain


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- metrics -------------------------------------------------------------------------------------
def test_free_form_metrics_match_hand_computed_values():
    assert normalise("The  Café, naïve!") == "café naïve"
    assert normalise("ＡＢＣ") == "abc"                                   # NFKC folds full-width letters
    assert exact_match("the Cat.", ["cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0
    assert exact_match("dog", ["cat", "A dog!"]) == 1.0                   # the best of several references
    # answer [cat, sat], reference [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)   # repeated tokens count once each
    assert token_f1("", [""]) == 1.0 and token_f1("", ["cat"]) == 0.0 and token_f1("cat", [""]) == 0.0
    assert token_f1("x", ["y", "x"]) == 1.0
    # answer [cat, sat, on, mat], reference [cat, on, mat]: LCS 3, P = 3/4, R = 1, F = 6/7
    assert rouge_l("cat sat on mat", ["cat on the mat"]) == pytest.approx(6 / 7)
    assert rouge_l("東京 大学 です", ["東京 大学"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))   # any script
    assert rouge_l("", [""]) == 1.0 and rouge_l("", ["cat"]) == 0.0
    assert rouge_l("mat on cat", ["cat on mat"]) == pytest.approx(1 / 3)       # order matters, unlike F1
    assert token_f1("mat on cat", ["cat on mat"]) == 1.0


def test_choice_picks_raw_and_length_normalised_with_ties_to_the_lowest_index():
    assert choice_picks([-1.0, -1.0, -2.0], ["ab", "ab", "x"]) == (0, 0)
    assert choice_picks([-4.0, -3.0], ["abcd", "a"]) == (1, 0)          # per byte: -1.0 beats -3.0
    # "é" is 2 UTF-8 bytes: -6.0 / 4 and -3.0 / 2 tie at -1.5 per byte, and the lowest index wins
    assert choice_picks([-6.0, -3.0], ["abcd", "é"]) == (1, 0)


def test_continual_summaries_and_seed_intervals():
    A = [[0.8, 0.3, 0.1], [0.6, 0.9, 0.2], [0.5, 0.7, 0.9]]
    base = [0.5, 0.2, 0.1]
    assert average_accuracy(A) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert backward_transfer(A) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert forward_transfer(A, base) == pytest.approx(((0.3 - 0.2) + (0.2 - 0.1)) / 2)
    assert backward_transfer([[0.5]]) is None and forward_transfer([[0.5]], [0.1]) is None
    ci = seed_interval([1.0, 2.0, 3.0])                  # sd 1, t(0.975, 2) = 4.302653
    assert ci["mean"] == 2.0 and ci["sd"] == pytest.approx(1.0)
    assert ci["high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert seed_interval([0.4])["low"] is None


# ---- task files ----------------------------------------------------------------------------------
def test_task_files_in_every_format(tmp_path):
    src = jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
         "references": ["Paris, France"]},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "Pick the fruit", "choices": ["apple", "chair"], "answer": 0},
        {"text": "The sun rises in the", "choices": ["east", "west"], "answer": 0},
        {"text": "Once upon a", "references": ["time"]},
    ])
    items = read_tasks(src)
    assert [it.kind for it in items] == [FREE, FREE, CHOICE, CHOICE, FREE]
    assert items[0].references == ("Paris", "Paris, France") and items[0].messages[-1]["role"] == "user"
    assert items[2].messages == ({"role": "user", "content": "Pick the fruit"},) and items[2].answer == 0
    assert items[3].context == "The sun rises in the" and items[3].query() == "The sun rises in the"
    mapped = jsonl(tmp_path / "m.jsonl", [{"question": "Pick one", "options": ["a b", "c d"], "label": 1}])
    item = read_tasks(mapped, columns="prompt=question,choices=options,answer=label")[0]
    assert item.kind == CHOICE and item.choices == ("a b", "c d") and item.answer == 1


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "'answer' must be the index of the right choice"),
    ({"prompt": "q", "choices": ["a", "b"], "answer": True}, "'answer' must be the index"),
    ({"prompt": "q", "choices": ["a", "a"], "answer": 0}, "at least 2 different choices"),
    ({"prompt": "q", "choices": "ab", "answer": 0}, "'choices' must be a non-empty list of strings"),
    ({"prompt": "q"}, "a free-form item needs a reference answer"),
    ({"question": "q", "answer": 0}, "record fits no format"),
])
def test_bad_task_items_name_file_and_line(tmp_path, row, message):
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "yes"}, row]
                if "question" not in row else [row])
    with pytest.raises(DataError, match=message) as err:
        read_tasks(src)
    assert f"{src}:{1 if 'question' in row else 2}" in str(err.value)


# ---- on a tiny model -----------------------------------------------------------------------------
def _conversation(rng: random.Random, k: int) -> dict:
    start = rng.randrange(4)
    answer = "".join("abcd"[(start + j) % 4] for j in range(rng.randrange(16, 24)))
    return {"messages": [{"role": "user", "content": f"xyzw {k} zwxy"}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def task_store(tmp_path_factory):
    """A tiny:llama store whose 'cyc' domain learned to answer in the a->b->c->d cycle; tasks to score it."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(5)
    train = jsonl(root / "cyc.jsonl", [_conversation(rng, k) for k in range(32)])
    hold = jsonl(root / "cyc_hold.jsonl", [_conversation(rng, 100 + k) for k in range(6)])
    choice = []
    for k in range(12):                   # the right choice follows the cycle; the others do not
        right = "".join("abcd"[(k + j) % 4] for j in range(12))
        wrong = ["".join(rng.choice("abcd") for _ in range(12)) for _ in range(2)]
        choices = [right, *wrong]
        rng.shuffle(choices)
        choice.append({"prompt": f"xyzw {200 + k} zwxy", "choices": choices, "answer": choices.index(right)})
    tasks = jsonl(root / "cyc_tasks.jsonl", choice + [
        {"prompt": f"xyzw {300 + k} zwxy", "completion": "abcdabcdabcd"} for k in range(4)])
    store = root / "store"
    assert main(["add", "--store", str(store), "--domain", "cyc", "--data", f"{train}:{hold}", "--model",
                 "tiny:llama", "--epochs", "4", "--lr", "1e-2", "--batch-size", "8", "--max-len", "96",
                 "--tasks", str(tasks), "--task-max-new-tokens", "12"]) == 0
    return {"root": root, "store": store, "tasks": tasks, "train": train, "hold": hold}


def test_multiple_choice_picks_what_the_adapter_learned_and_add_records_it(task_store):
    store = Store(task_store["store"])
    rec = store.adapter_meta("cyc")["tasks"]
    assert rec["items"] == 16 and rec["metrics"]["choice_items"] == 12 and rec["metrics"]["free_form_items"] == 4
    assert rec["metrics"]["accuracy_norm"] == 1.0 > rec["base_metrics"]["accuracy_norm"]
    assert rec["score"] > rec["base_score"]
    assert store.manifest["adapters"]["cyc"]["1"]["tasks"]["score"] == rec["score"]       # and in the manifest
    live = LiveModel.open(store)
    items = TaskSet.load("cyc", task_store["tasks"]).items
    again = score_tasks(live, items, domain="cyc", backbone="pinned")
    assert again.score == rec["score"] and again.metrics == rec["metrics"]          # pinned: exactly as recorded


def test_scores_stay_exact_after_a_later_add_and_eval_reports_them(task_store, tmp_path, capsys):
    rng = random.Random(9)
    other = jsonl(tmp_path / "other.jsonl", [{"text": "".join(rng.choice("xyzw") for _ in range(50))}
                                             for _ in range(20)])
    store = tmp_path / "store"
    shutil.copytree(task_store["store"], store)
    assert main(["add", "--store", str(store), "--domain", "other", "--data", str(other), "--epochs", "1",
                 "--lr", "1e-2", "--max-len", "64"]) == 0
    capsys.readouterr()
    assert main(["eval", "--store", str(store), "--tasks", f"cyc={task_store['tasks']}", "--json",
                 "--task-max-new-tokens", "12"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["tasks"]
    recorded = Store(store).adapter_meta("cyc")["tasks"]
    assert row["served_by"] == "cyc" and row["recorded"] == recorded["score"]
    assert row["score"]["pinned"] == recorded["score"]                   # the later add changed nothing
    assert row["base"] == pytest.approx(recorded["base_score"])
    assert set(row["score"]) == {"pinned", "latest"}
    assert main(["eval", "--store", str(store), "--tasks", f"cyc={task_store['tasks']}", "--domain", "auto",
                 "--backbone", "pinned", "--task-max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "served by" in out and "the router served" in out
    assert main(["eval", "--store", str(store), "--tasks", f"nope={task_store['tasks']}"]) == 2
    assert "'nope' is not a domain" in capsys.readouterr().err


def test_the_task_gate_refuses_and_changes_nothing(task_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(task_store["store"], store)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    rng = random.Random(4)
    noise = jsonl(tmp_path / "noise.jsonl", [{"text": "".join(rng.choice("pq") for _ in range(40))}
                                             for _ in range(16)])
    args = ["add", "--store", str(store), "--domain", "noise", "--data", str(noise), "--epochs", "1", "--lr",
            "1e-2", "--max-len", "64", "--tasks", str(task_store["tasks"]), "--task-max-new-tokens", "12"]
    capsys.readouterr()
    assert main(args + ["--min-task-score", "1.0"]) == 1
    out = capsys.readouterr().out
    assert "not registered: task score" in out and "below --min-task-score 1.0000" in out
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before
    assert main(args + ["--min-task-score", "2"]) == 2
    assert "--min-task-score" in capsys.readouterr().err
    assert main(args[:-4] + ["--min-task-score", "base"]) == 2
    assert "give the task items with --tasks" in capsys.readouterr().err


def test_batched_greedy_answers_equal_crma_generate(task_store):
    """Free-form answers come from left-padded batches; each equals `crma generate`'s greedy answer alone."""
    live = LiveModel.open(Store(task_store["store"]))
    questions = ["xyzw 1 zwxy", "xyzw 123456 zwxy and more", "q"]          # different lengths: padding
    with live.using("cyc") as model:
        got = greedy_answers(model, live.tokenizer, [prompt_ids(live.tokenizer, [{"role": "user", "content": q}])
                                                     for q in questions], max_new_tokens=10, batch_size=3)
    for q, answer in zip(questions, got):
        assert answer == generate(live, q, domain="cyc", temperature=0, max_new_tokens=10).text


def _cycle_tasks(path, cycle: str, n: int, seed: int):
    """Multiple-choice continuations: an opening in `cycle`, its true continuation and two from other cycles."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(4)
        text = "".join(cycle[(start + k) % 4] for k in range(24))
        right = "".join(cycle[(start + 24 + k) % 4] for k in range(8))
        wrong = ["".join(rng.choice("abcdxyzw") for _ in range(8)) for _ in range(2)]
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"text": text, "choices": choices, "answer": choices.index(right)})
    return jsonl(path, rows)


@pytest.mark.parametrize("condition", ["modular", "olora"])   # naive: modular's path without the pinned view
def test_a_run_with_tasks_builds_the_accuracy_matrix(tmp_path, condition):
    """After every phase the seen domains and the next one are scored; pinned scores of earlier domains never
    change; ACC/BWT/FWT follow GEM's definitions from the matrix; an off-domain set is scored as routed traffic."""
    data = {d: write_cycle_domain(tmp_path / f"{d}.jsonl", c, 16, k) for k, (d, c) in
            enumerate({"up": "abcd", "down": "dcba", "zig": "xyzw"}.items())}
    tasks = {d: _cycle_tasks(tmp_path / f"{d}_tasks.jsonl", c, 6, 10 + k) for k, (d, c) in
             enumerate({"up": "abcd", "down": "dcba", "zig": "xyzw"}.items())}
    general = jsonl(tmp_path / "general.jsonl", [{"prompt": "Who wrote Hamlet?", "completion": "Shakespeare"},
                                                 {"prompt": "Pick", "choices": ["yes", "no"], "answer": 0}])
    out = tmp_path / "run"
    args = ["run", "--model", "tiny:llama", "--condition", condition, "--out", str(out), "--epochs", "1", "--lr",
            "1e-2", "--batch-size", "8", "--max-len", "64", "--task-max-new-tokens", "4",
            "--domains", *[f"{d}={p}" for d, p in data.items()],
            "--tasks", *[f"{d}={p}" for d, p in tasks.items()], f"general={general}"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    A = res["task_matrix_pinned" if condition == "modular" else "task_matrix"]
    assert [[v is not None for v in row] for row in A] == [[True, True, False], [True, True, True],
                                                           [True, True, True]]
    base = [res["task_base"][d] for d in ("up", "down", "zig")]
    assert res[f"task_acc{'_pinned' if condition == 'modular' else ''}"] == pytest.approx(sum(A[2]) / 3)
    suffix = "_pinned" if condition == "modular" else ""
    assert res[f"task_bwt{suffix}"] == pytest.approx(((A[2][0] - A[0][0]) + (A[2][1] - A[1][1])) / 2)
    assert res[f"task_fwt{suffix}"] == pytest.approx(((A[0][1] - base[1]) + (A[1][2] - base[2])) / 2)
    if condition == "modular":                       # pinned: each adapter's own cell, kept; the next domain's
        L = res["task_matrix"]
        assert A == [[L[0][0], L[0][1], None], [L[0][0], L[1][1], L[1][2]], [L[0][0], L[1][1], L[2][2]]]
    g = res["task_general"]["general"]
    assert len(g["routed"]) == 1 and sum(g["routed"][-1]["served"].values()) == 2 and 0 <= g["base"] <= 1
    if condition == "olora":                         # no router: every item on all adapters summed, as it serves
        assert g["routed"][-1]["served"] == {"all adapters summed": 2}


def test_benchmark_task_summary_intervals_across_seeds_and_plot(tmp_path):
    """ACC/BWT/FWT per seed, then a Student-t interval over seeds (not over pooled items); modular counted twice
    (pinned as served, latest); the report's table and the heatmap file."""
    def run(cond, seed, A, P=None):
        res = {"finished": True, "condition": cond, "seed": seed, "domains": ["a", "b"], "task_matrix": A,
               "task_base": {"a": 0.25, "b": 0.25, "general": 0.5},
               "task_general": {"general": {"base": 0.5, "routed": [{"score": 0.5, "served": {"base": 4}}]}}}
        if P is not None:
            res["task_matrix_pinned"] = P
        return res

    results = [run("naive", 0, [[0.9, 0.3], [0.5, 0.8]]), run("naive", 42, [[0.7, 0.3], [0.5, 0.6]]),
               run("modular", 0, [[0.9, 0.3], [0.8, 0.8]], [[0.9, 0.3], [0.9, 0.8]]),
               {"finished": False, "condition": "frozen", "seed": 0}]
    s = task_summary(results)
    assert set(s) == {"naive", "modular", "modular-pinned"}
    naive = s["naive"]
    assert naive["bwt"]["values"] == pytest.approx([-0.4, -0.2]) and naive["bwt"]["mean"] == pytest.approx(-0.3)
    assert naive["bwt"]["high"] - naive["bwt"]["mean"] == pytest.approx(12.706205 * (0.2 ** 2 / 2) ** 0.5 / 2 ** 0.5,
                                                                        rel=1e-5)
    assert naive["acc"]["values"] == pytest.approx([0.65, 0.55]) and naive["fwt"]["values"] == pytest.approx([0.05] * 2)
    assert s["modular-pinned"]["bwt"]["values"] == [0.0] and s["modular-pinned"]["bwt"]["low"] is None
    assert s["modular"]["bwt"]["values"] == pytest.approx([-0.1])
    assert [v for row in naive["matrix"] for v in row] == pytest.approx([0.8, 0.3, 0.5, 0.7])
    text = "\n".join(task_lines(s, ["a", "b"]))
    assert "| naive | 0, 42 | +0.600 [" in text and "| modular-pinned | 0 | +0.850 (1 seed) | +0.000 (1 seed)" in text
    assert "| naive | general | 0.500 | 0.500 |" in text
    assert task_plot(tmp_path, s, ["a", "b"], _save) == ["task_matrices.png"]
    assert (tmp_path / "task_matrices.png").stat().st_size > 1000


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_choices_scored_with_the_question_encoded_once_equal_whole_rows(family):
    """The question's key/value cache, repeated for every choice, gives the log-likelihoods of scoring each
    question + choice row whole (choices of different lengths: padding)."""
    model, tok = load_model(f"tiny:{family}")
    model.eval()
    q = tok("The sun rises in the", add_special_tokens=True)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in (" east", " west and sets", " x")]
    shared = _one_item(model, q, conts, tok.pad_token_id, torch.device("cpu"))
    rows = [Example(q + c, ((len(q), len(q) + len(c)),)) for c in conts]
    whole = [-s for s, _ in passage_losses(model, rows, 8, tok.pad_token_id, progress=False)]
    assert shared == pytest.approx(whole, rel=1e-4, abs=1e-4)


def test_task_gate_thresholds():
    rec = {"name": "cyc", "items": 16, "score": 0.4, "base_score": 0.5}
    assert "below the base model's 0.5000" in task_gate(rec, "base")
    assert task_gate({**rec, "score": 0.5}, "base") is None                  # equal to the base model passes
    assert task_gate(rec, 0.4) is None and "below --min-task-score 0.4500" in task_gate(rec, 0.45)
    assert task_gate(rec, None) is None
    assert parse_min_score("base") == "base" and parse_min_score("0.25") == 0.25 and parse_min_score(None) is None
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(ConfigError, match="--min-task-score"):
            parse_min_score(bad)


def test_free_form_items_are_refused_on_a_sharded_base_before_anything_trains(tmp_path, capsys):
    src = jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "choices": ["a", "b"], "answer": 0},
                                       {"prompt": "2+2?", "completion": "4"}])
    items = read_tasks(src)
    check_sharding(items[:1], True)                                   # choices only: scored in lockstep
    with pytest.raises(ConfigError, match="sharded base"):
        check_sharding(items, True)
    assert main(["add", "--store", str(tmp_path / "s"), "--domain", "x", "--data", str(src), "--tasks", str(src),
                 "--fsdp"]) == 2
    assert "sharded base (--fsdp)" in capsys.readouterr().err and not (tmp_path / "s").exists()
