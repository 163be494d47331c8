"""One domain's data, ready to train and evaluate: records read, the holdout split, examples, statistics.

    records = read_records("support.jsonl", fmt="auto", columns="", domain="support")
    dom = load_domain("support", "support.jsonl", None, tokenizer, TrainConfig())

The holdout is the holdout source when given, else a deterministic share of the train records (by content
hash). Holdout records whose text also appears on the train side (after whitespace normalisation) are
removed from the holdout and counted.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..config import TrainConfig
from .examples import DataStats, Example, build_examples
from .formats import Record, table_records
from .sources import DataError, read_tables


def read_records(source, fmt: str = "auto", columns: str = "", domain: str | None = None,
                 need_answer: bool = True) -> list[Record]:
    """Every record of a source (file, folder, saved dataset, hf:// spec), each table's format decided apart."""
    return [r for t in read_tables(source) for r in table_records(t, fmt, columns, domain, need_answer)]


def read_queries(source, fmt: str = "auto", columns: str = "") -> list[str]:
    """Query texts of a source: texts, or the last user turn of each conversation (what a request routes on).
    Plain-text files (.txt) hold one query a line."""
    tables = read_tables(source)
    out = []
    for t in tables:
        if t.name.endswith(".txt"):
            out += [line.strip() for row in t.rows for line in row.splitlines() if line.strip()]
        else:
            out += [r.query() for r in table_records(t, fmt, columns, need_answer=False)]
    return out


def read_texts(source, domain: str | None = None) -> list[str]:
    """The text of each record of a source (conversations as their turns, one per line)."""
    return [r.canonical() for r in read_records(source, domain=domain)]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalised(text: str) -> str:
    return " ".join(text.split())


def split_holdout(records: list, fraction: float) -> tuple[list, list]:
    """Deterministic train/holdout split by content hash: the same record always lands on the same side,
    whatever the order of the others. `records` are Records or strings."""
    if len(records) < 2:
        raise DataError(f"need at least 2 records to hold some out, got {len(records)}")
    keys = [_hash(r if isinstance(r, str) else r.canonical()) for r in records]
    n_hold = max(1, round(len(records) * fraction))
    held = set(sorted(range(len(records)), key=lambda i: keys[i])[:n_hold])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def record_key(record: Record) -> str:
    """sha256 of a record's whitespace-normalised text: how duplicates are found and remembered."""
    return _hash(normalised(record.canonical()))


def drop_duplicates(train: list[Record], holdout: list[Record]) -> tuple[list[Record], list[str]]:
    """The holdout without records whose normalised text is also on the train side, and the keys of those
    removed (a store records them, so that `crma eval` on the same holdout file drops the same records)."""
    seen = {record_key(r) for r in train}
    removed = [record_key(r) for r in holdout if record_key(r) in seen]
    return drop_keys(holdout, removed), removed


def drop_keys(records: list[Record], keys: list[str]) -> list[Record]:
    gone = set(keys)
    return [r for r in records if record_key(r) not in gone] if gone else records


@dataclass
class DomainData:
    name: str
    train: list[Example]
    holdout: list[Example]
    train_records: list[Record] = field(default_factory=list)     # never stored: only checksums and counts
    holdout_records: list[Record] = field(default_factory=list)
    train_origin: list[int] = field(default_factory=list)         # the record each training example came from
    stats: dict[str, DataStats] = field(default_factory=dict)     # "train" / "holdout"
    route_texts: list[str] = field(default_factory=list)          # what the router builds this domain from
    duplicates: list[str] = field(default_factory=list)           # record_key of holdout records dropped

    @property
    def train_texts(self) -> list[str]:
        return [r.canonical() for r in self.train_records]

    @property
    def holdout_texts(self) -> list[str]:
        return [r.canonical() for r in self.holdout_records]


def examples_for(records: list[Record], tokenizer, cfg: TrainConfig):
    """build_examples with a TrainConfig's (or an adapter's recorded) length and loss settings."""
    return build_examples(records, tokenizer, cfg.max_len, cfg.long_inputs, cfg.stride, cfg.loss_on)


def load_domain(name: str, train: str, holdout: str | None, tokenizer, cfg: TrainConfig,
                route_examples: str | None = None) -> DomainData:
    """Read, split and tokenise one domain. DataError names the file and line of any bad record."""
    train_recs = read_records(train, cfg.format, cfg.columns, name)
    if holdout is not None:
        hold_recs = read_records(holdout, cfg.format, cfg.columns, name)
    else:
        train_recs, hold_recs = split_holdout(train_recs, cfg.holdout_fraction)
    if cfg.max_passages:
        train_recs = train_recs[: cfg.max_passages]
    hold_recs, duplicates = drop_duplicates(train_recs, hold_recs)
    if cfg.max_holdout:
        hold_recs = hold_recs[: cfg.max_holdout]
    if not hold_recs:
        raise DataError(f"{holdout or train}: no holdout records left for {name}"
                        + (f" ({len(duplicates)} were duplicates of training records)" if duplicates else ""))
    train_ex, origin, train_stats = examples_for(train_recs, tokenizer, cfg)
    hold_ex, _, hold_stats = examples_for(hold_recs, tokenizer, cfg)
    hold_stats.duplicates_removed = len(duplicates)
    for part, made, stats, source in (("train", train_ex, train_stats, train),
                                      ("holdout", hold_ex, hold_stats, holdout or train)):
        if not made:
            raise DataError(f"{source}: no {part} examples for {name} after tokenising ({stats.line()})")
    queries = [q for r in train_recs for q in r.user_turns()]
    if route_examples is not None:
        queries += read_queries(route_examples)             # its own format, detected
    return DomainData(name, train_ex, hold_ex, train_recs, hold_recs, origin,
                      {"train": train_stats, "holdout": hold_stats}, queries, duplicates)
