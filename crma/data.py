"""Reading domain text (JSONL with a `text` field, plain .txt, folders of them) and batching it.

Every bad input raises DataError naming the file and line: invalid JSON, a missing or non-string
`text`, an empty file, bytes that are not UTF-8, a record whose `domain` is not the domain asked for.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

SUFFIXES = (".jsonl", ".txt")
DEMO_DIR = Path(__file__).parent / "demo_data"       # the bundled demo domains (crma demo, the smoke benchmark)


class DataError(ValueError):
    """Bad input data; the message names the file (and line where there is one)."""


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from err


def read_jsonl(path: Path, domain: str | None = None) -> list[str]:
    """Texts of a JSON Lines file; each line an object with a string `text` (blank lines skipped)."""
    texts = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path}:{lineno}: record has no 'text' field")
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{path}:{lineno}: 'text' must be a non-empty string")
        if domain is not None and "domain" in record and record["domain"] != domain:
            raise DataError(f"{path}:{lineno}: record is from domain {record['domain']!r}, "
                            f"but this file was given for domain {domain!r}")
        texts.append(record["text"])
    return texts


def read_txt(path: Path) -> list[str]:
    """Passages of a plain text file: paragraphs separated by blank lines."""
    text = _read_utf8(path)
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def read_passages(path: str | Path, domain: str | None = None) -> list[str]:
    """Passages from a .jsonl or .txt file, or every such file in a folder (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl or .txt files")
    else:
        files = [path]
    texts = []
    for file in files:
        if file.suffix not in SUFFIXES:
            raise DataError(f"{file}: unsupported file type {file.suffix!r} (use .jsonl or .txt)")
        found = read_jsonl(file, domain) if file.suffix == ".jsonl" else read_txt(file)
        if not found:
            raise DataError(f"{file}: empty file (no passages)")
        texts.extend(found)
    return texts


def split_holdout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/holdout split by content hash: the same text always lands on the same side."""
    def key(t: str) -> str:
        return hashlib.sha256(t.encode("utf-8")).hexdigest()
    n_hold = max(1, round(len(texts) * fraction))
    if len(texts) < 2:
        raise DataError(f"need at least 2 passages to hold some out, got {len(texts)}")
    held = set(sorted(range(len(texts)), key=lambda i: key(texts[i]))[:n_hold])
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


def tokenize(texts: list[str], tokenizer, max_len: int) -> list[list[int]]:
    """Token ids per passage, truncated to max_len (passages shorter than 2 tokens are dropped)."""
    ids = tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
    return [x for x in ids if len(x) >= 2]


def epoch_order(n: int, epochs: int, seed: int) -> list[int]:
    """Example order for all epochs: one seeded shuffle per epoch. Same for every condition."""
    rng = random.Random(seed)
    order = []
    for _ in range(epochs):
        idx = list(range(n))
        rng.shuffle(idx)
        order.extend(idx)
    return order


def collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of token lists: input_ids/attention_mask/labels, each (batch, max_len)."""
    width = max(len(x) for x in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, x in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
