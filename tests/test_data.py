"""Reading domain data: formats, deterministic splits, and a clear error for every bad input."""
import json

import pytest

from crma.cli import main
from crma.config import ConfigError, DomainSpec
from crma.data import DataError, Record, build_examples, collate, epoch_order, read_texts, split_holdout
from crma.method.models import byte_tokenizer


def write(path, content: str | bytes):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_jsonl_txt_and_directories(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "one", "domain": "med"}\n\n{"text": "two"}\n')
    write(tmp_path / "b.txt", "first paragraph\nstill first\n\nsecond paragraph\n")
    assert read_texts(tmp_path / "a.jsonl", "med") == ["one", "two"]
    assert read_texts(tmp_path / "b.txt") == ["first paragraph\nstill first", "second paragraph"]
    assert read_texts(tmp_path) == ["one", "two", "first paragraph\nstill first", "second paragraph"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: record has no 'text' field"),
    ('{"text": 5}\n', r"bad\.jsonl:1: 'text' must be a non-empty string"),
    ('', r"bad\.jsonl: empty file"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not UTF-8"),
    ('{"text": "ok", "domain": "medical"}\n{"text": "x", "domain": "legal"}\n',
     r"bad\.jsonl:2: record is from domain 'legal'.*domain 'medical'"),
])
def test_bad_input_names_file_and_line(tmp_path, content, message):
    write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=message):
        read_texts(tmp_path / "bad.jsonl", "medical")


def test_missing_paths_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_texts(write(tmp_path / "x.xml", "<a/>"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl, .json, .csv, .parquet, .txt files"):
        read_texts(tmp_path / "empty")


def test_domain_spec_parsing_and_names():
    spec = DomainSpec.parse("medical=train.jsonl:hold.jsonl")
    assert (spec.name, str(spec.train), str(spec.holdout)) == ("medical", "train.jsonl", "hold.jsonl")
    assert DomainSpec.parse("legal=dir").holdout is None
    for bad in ("medical", "=x.jsonl", "bad name=x.jsonl", "base=x.jsonl"):
        with pytest.raises(ConfigError, match="domain"):
            DomainSpec.parse(bad)


def test_holdout_split_is_deterministic_and_disjoint():
    texts = [f"passage number {i}" for i in range(50)]
    train, hold = split_holdout(texts, 0.1)
    train_r, hold_r = split_holdout(list(reversed(texts)), 0.1)     # the same passages, whatever the order
    assert (train_r, hold_r) == (train[::-1], hold[::-1])
    assert split_holdout(texts[:25], 0.2)[1] != hold[:5]              # ...and it depends on the content
    assert len(hold) == 5 and not set(train) & set(hold) and len(train) + len(hold) == 50


def test_tokenize_order_and_collate():
    tok = byte_tokenizer()
    records = [Record("x", text=t) for t in ("hello", "a", "hello world, longer")]
    ids, origin, stats = build_examples(records, tok, max_len=8, long_inputs="truncate")
    assert [len(x) for x in ids] == [5, 8] and origin == [0, 2]   # 1-token passage dropped, long one truncated
    assert stats.records_dropped == {"record shorter than 2 tokens": 1}
    assert epoch_order(10, 2, seed=3) == epoch_order(10, 2, seed=3) != epoch_order(10, 2, seed=4)
    batch = collate(ids, pad_id=256)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, 5:].eq(-100).all() and batch["attention_mask"][0].sum() == 5


def test_cli_reports_bad_data_with_exit_code_2(tmp_path, capsys):
    write(tmp_path / "bad.jsonl", '{"text": "fine"}\nnot json\n')
    out = tmp_path / "run"
    code = main(["run", "--model", "tiny:llama", "--domains", f"med={tmp_path / 'bad.jsonl'}",
                 "--out", str(out)])
    assert code == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_cli_rejects_bad_settings(tmp_path, capsys):
    write(tmp_path / "ok.jsonl", json.dumps({"text": "fine text"}) + "\n")
    code = main(["run", "--model", "tiny:llama", "--domains", f"med={tmp_path / 'ok.jsonl'}",
                 "--out", str(tmp_path / "o"), "--crma-rho", "2.0"])
    assert code == 2 and "crma.rho" in capsys.readouterr().err
