"""Data formats: every source and record format, every error naming its file and line, the loss on answers
only (checked token by token), windows over long documents, and training text equal to what the server renders."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crma.config import ConfigError, DomainSpec, TrainConfig
from crma.data import (
    DataError,
    Record,
    build_examples,
    load_domain,
    prompt_ids,
    read_queries,
    read_records,
    render,
    windows,
)
from crma.method.models import byte_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."}]


@pytest.fixture(params=["template", "plain"])
def tok(request):
    """The byte tokenizer with a ChatML template, and without one (the plain template)."""
    t = byte_tokenizer()
    if request.param == "template":
        t.chat_template = CHATML
    return t


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_record_format_becomes_the_same_conversation(tmp_path):
    qa = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    files = {
        "messages.jsonl": [{"messages": qa}],
        "pc.jsonl": [{"prompt": "q1", "completion": "a1"}],
        "trl_conv.jsonl": [{"prompt": [qa[0]], "completion": [qa[1]]}],
        "alpaca.json": None,
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}],
    }
    for name, rows in files.items():
        if rows is not None:
            jsonl(tmp_path / name, rows)
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "q1", "input": "", "output": "a1"}]))
    for name in files:
        (rec,) = read_records(tmp_path / name)
        assert rec.messages == tuple(qa) and rec.is_chat, name
    (rec,) = read_records(jsonl(tmp_path / "al2.jsonl", [{"instruction": "Sum", "input": "2 and 2", "output": "4"}]))
    assert rec.messages[0]["content"] == "Sum\n\n2 and 2"
    (rec,) = read_records(jsonl(tmp_path / "t.jsonl", [{"text": "plain passage"}]))
    assert rec.text == "plain passage" and not rec.is_chat


def test_tables_folders_saved_datasets_and_column_mapping(tmp_path):
    import datasets
    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(4)]
    (tmp_path / "t.csv").write_text("question,answer,id\n" + "".join(f"{r['question']},\"{r['answer']}\",{r['id']}\n"
                                                                        for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dd"))
    cols = "prompt=question,completion=answer"
    for source in ("t.csv", "t.parquet", "saved"):
        recs = read_records(tmp_path / source, columns=cols)
        assert [r.messages[1]["content"] for r in recs] == ["a0", "a1", "a2", "a3"], source
    assert [r.messages[0]["content"] for r in read_records(f"{tmp_path / 'dd'}?split=test", columns=cols)] == \
        ["q2", "q3"]
    with pytest.raises(DataError, match=r"choose a split with \?split=NAME \(it has train, test\)"):
        read_records(tmp_path / "dd", columns=cols)
    with pytest.raises(DataError, match=r"t\.csv row 1: record fits no format \(fields found: answer, id, question\)"):
        read_records(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"t\.csv row 1: .*no 'completion' field.*fields found: answer, id, question"):
        read_records(tmp_path / "t.csv", fmt="prompt-completion", columns="prompt=question")
    folder = tmp_path / "mixed"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    (folder / "b.txt").write_text("para one\n\npara two\n")
    recs = read_records(folder)
    assert [r.is_chat for r in recs] == [True, False, False]      # the format is decided per file


def test_hub_spec_loads_through_datasets_and_says_when_not_cached(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p2", "completion": "c2"}])
    recs = read_records(f"hf://json?data_files={data}&split=train")      # a packaged builder: works offline
    assert [r.messages[1]["content"] for r in recs] == ["c", "c2"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf://nobody/no-such-set: cannot load .*not a local dataset and not in the "
                                        r"Hugging Face cache \(offline mode\)"):
        read_records("hf://nobody/no-such-set")
    with pytest.raises(DataError, match="unknown colour"):
        read_records("hf://x?colour=red")
    spec = DomainSpec.parse("med=hf://org/set?split=train:hf://org/set?split=test")
    assert (spec.train, spec.holdout) == ("hf://org/set?split=train", "hf://org/set?split=test")


CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("first, row, message", [
    ({"body": "x"}, {"text": "x"}, r"bad\.jsonl:1: record fits no format \(fields found: body\); formats: text"),
    ({"text": "fine"}, {"body": "x"},
     r"bad\.jsonl:2: record has no 'text' field for format text \(fields found: body\)"),
    (CHAT, {"messages": []}, r"bad\.jsonl:2: expected a non-empty list of turns"),
    (CHAT, {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
     r"bad\.jsonl:2: turn 1 \(user\) content must be a non-empty string"),
    (CHAT, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     r"bad\.jsonl:2: turn 1 has role 'assistant' where 'user' was expected"),
    (CHAT, {"messages": [{"role": "user", "content": "q"}]},
     r"bad\.jsonl:2: the conversation must end with an assistant"),
    (CHAT, {"messages": [{"role": "robot", "content": "q"}]}, r"bad\.jsonl:2: turn 1 has role 'robot'; roles: system"),
    (CHAT, {"messages": [{"role": "user", "text": "q"}]},
     r"bad\.jsonl:2: turn 1 must be an object with 'role' and 'content' \(found \['role', 'text'\]\)"),
    ({"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""},
     r"bad\.jsonl:2: 'completion' must be a non-empty string"),
    ({"prompt": "q", "completion": "a"}, {"prompt": "q"},
     r"bad\.jsonl:2: record has no 'completion' field for format prompt-completion"),
    (CHAT, "not json", r"bad\.jsonl:2: invalid JSON"),
    ({"text": "ok", "domain": "med"}, {"text": "x", "domain": "legal"},
     r"bad\.jsonl:2: record is from domain 'legal', but this file was given for domain 'med'"),
])
def test_bad_records_name_file_line_fields_and_formats(tmp_path, first, row, message):
    jsonl(tmp_path / "bad.jsonl", [first, row])
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / "bad.jsonl", domain="med")


def test_loss_covers_exactly_the_answer_tokens(tok):
    rec = Record("x", messages=tuple(CONV))
    (ex,), _, stats = build_examples([rec], tok, max_len=4096, loss_on="completion")
    labels = ex.labels()
    answers = []
    for i, m in enumerate(CONV):                      # each answer's tokens, where the rendering puts them
        if m["role"] == "assistant":
            start = len(prompt_ids(tok, CONV[:i]))
            end = len(tok(render(tok, CONV[: i + 1], False), add_special_tokens=False)["input_ids"])
            answers.append((start, end))
    for pos, (token, label) in enumerate(zip(ex.ids, labels, strict=True)):
        inside = any(s <= pos < e for s, e in answers)
        assert label == (token if inside else -100), pos
    assert stats.tokens_trained == sum(e - s for s, e in answers) and stats.examples == 1
    assert tok.decode([t for t, la in zip(ex.ids, labels, strict=True) if la != -100]).lstrip().startswith("Four.")
    (whole,), _, _ = build_examples([rec], tok, max_len=4096, loss_on="all")
    assert whole.labels()[1:] == whole.ids[1:]


def test_training_text_is_what_the_server_renders_plus_the_answer(tok):
    msgs = CONV[:3]
    (ex,), _, _ = build_examples([Record("x", messages=tuple(msgs))], tok, max_len=4096)
    served = prompt_ids(tok, msgs[:-1])                       # what crma serve / crma generate feed the model
    assert ex.ids[: len(served)] == served
    first_label = next(i for i, la in enumerate(ex.labels()) if la != -100)
    assert first_label == len(served)
    assert tok.decode(ex.ids[len(served):]).lstrip().startswith("Four.")


@pytest.mark.parametrize("stride", [0, 3])
def test_windows_cover_every_token(stride):
    n, max_len = 50, 16
    wins = windows(n, max_len, stride)
    targets = [p for _, _, first in wins for p in range(first, _end(wins, first))]
    covered = [p for s, e, _ in wins for p in range(s, e)]
    assert all(e - s <= max_len for s, e, _ in wins)
    if stride == 0:
        assert covered == list(range(n))                  # every token in exactly one window
    assert targets == list(range(n))                      # every token a target of exactly one window


def _end(wins, first):
    return next(e for _, e, f in wins if f == first)


def test_long_documents_are_windowed_not_cut(tmp_path):
    tok = byte_tokenizer()
    text = "".join(chr(97 + i % 26) for i in range(1000))
    rec = Record("x", text=text)
    ex, origin, stats = build_examples([rec], tok, max_len=100, long_inputs="window")
    assert origin == [0] * len(ex) and sum(len(e) for e in ex) == 1000 == stats.tokens_read
    assert b"".join(bytes(tok.decode(e.ids), "utf-8") for e in ex).decode() == text
    assert stats.tokens_trained == 1000 - len(ex) and not stats.tokens_dropped
    ex, _, stats = build_examples([rec], tok, max_len=100, long_inputs="window", stride=10)
    assert stats.tokens_trained == 999                   # every token but the first is predicted once
    ex, _, stats = build_examples([rec], tok, max_len=100, long_inputs="truncate")
    assert len(ex) == 1 and stats.tokens_dropped == {"cut at max_len (long_inputs=truncate)": 900}


def test_long_conversations_keep_their_final_answer_or_are_dropped(tok):
    long_q = "x" * 300
    rec = Record("a", messages=({"role": "user", "content": long_q}, {"role": "assistant", "content": "short"}))
    (ex,), _, stats = build_examples([rec], tok, max_len=64)
    assert len(ex) == 64 and tok.decode(ex.ids).rstrip().endswith(("short<|im_end|>", "short<|endoftext|>"))
    assert list(stats.tokens_dropped) == ["conversation turns cut from the left at max_len"]
    huge = Record("b", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 300}))
    ex, _, stats = build_examples([huge], tok, max_len=64)
    assert ex == [] and stats.records_dropped == {"conversation whose final answer is longer than max_len": 1}


def test_domain_split_duplicates_stats_and_router_texts(tmp_path, tok):
    conv = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(12)]
    train = jsonl(tmp_path / "train.jsonl", conv)
    hold = jsonl(tmp_path / "hold.jsonl", [conv[0], {"messages": [{"role": "user", "content": "question  0 "},
                                                                  {"role": "assistant", "content": "answer 0"}]},
                                           {"messages": [{"role": "user", "content": "new"},
                                                         {"role": "assistant", "content": "fresh"}]}])
    queries = tmp_path / "q.txt"                    # --route-examples: one query a line, in a format of its own
    queries.write_text("how do I ask?\nwhere is it?\n")
    dom = load_domain("support", str(train), str(hold), tok, TrainConfig(max_len=128), str(queries))
    assert dom.stats["holdout"].duplicates_removed == 2 and len(dom.holdout_records) == 1
    assert dom.route_texts == [f"question {i}" for i in range(12)] + ["how do I ask?", "where is it?"]
    assert dom.stats["train"].records == 12 and dom.stats["train"].examples == 12
    split = load_domain("support", str(train), None, tok, TrainConfig(max_len=128, holdout_fraction=0.25))
    assert len(split.holdout_records) == 3 and len(split.train_records) == 9
    assert read_queries(hold) == ["question 0", "question  0 ", "new"]


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="train.format"):
        TrainConfig(format="csv")
    with pytest.raises(ConfigError, match="train.stride"):
        TrainConfig(max_len=16, stride=15)
    with pytest.raises(ConfigError, match="train.loss_on"):
        TrainConfig(loss_on="answers")
