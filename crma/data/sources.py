"""Where records come from: files, folders of them, saved `datasets` datasets and `load_dataset` specs.

    train.jsonl  data.json  table.csv  table.parquet  notes.txt     one file
    corpus/                                   every supported file under it, recursively, sorted by path
    saved/          (a folder written by datasets' save_to_disk)     its rows; `saved/?split=test` for one split
    hf://NAME?config=C&split=S&revision=R&data_files=F              datasets.load_dataset, offline from its cache

Each source yields `Table`s (one per file, or one per dataset): the rows, each with its origin
("file.jsonl:12", "table.csv row 3") so that every error names the file and the line or row. Record formats
(text, messages, prompt/completion, ...) are decided per table in crma/data/formats.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
HUB = "hf://"
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class DataError(ValueError):
    """Bad input data; the message names the file (and line or row where there is one)."""


@dataclass
class Table:
    """The rows of one file or dataset: JSON objects / table rows (dicts), or plain-text passages (str)."""

    name: str                      # the file or dataset, as errors name it
    rows: list                     # dict per record (str for .txt passages)
    origins: list[str]             # "name:LINE" or "name row N", one per row


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from err


def _json_lines(path: Path, text: str) -> Table:
    rows, origins = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        origins.append(f"{path}:{lineno}")
    return Table(str(path), rows, origins)


def read_json(path: Path) -> Table:
    """.jsonl: one JSON value a line (blank lines skipped). .json: one array of records, or JSON lines."""
    text = _read_utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        return Table(str(path), items, [f"{path} item {i}" for i in range(1, len(items) + 1)])
    return _json_lines(path, text)


def read_txt(path: Path) -> Table:
    """Passages of a plain text file: paragraphs separated by blank lines (Windows line ends accepted)."""
    text = _read_utf8(path).replace("\r\n", "\n")
    rows, origins, line = [], [], 1
    for block in text.split("\n\n"):
        if block.strip():
            rows.append(block.strip())
            origins.append(f"{path}:{line + len(block) - len(block.lstrip(chr(10)))}")
        line += block.count("\n") + 2
    return Table(str(path), rows, origins)


def read_arrow(path: Path) -> Table:
    """.csv (header row first) and .parquet, read with pyarrow; rows are numbered from 1 after the header."""
    import pyarrow  # heavy: only for tabular files
    import pyarrow.csv  # heavy
    import pyarrow.parquet  # heavy
    try:
        if path.suffix == ".csv":
            table = pyarrow.csv.read_csv(path, read_options=pyarrow.csv.ReadOptions(encoding="utf8"),
                                         convert_options=pyarrow.csv.ConvertOptions(strings_can_be_null=True))
        else:
            table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {err}") from err
    rows = table.to_pylist()
    return Table(str(path), rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)])


def _query(spec: str) -> tuple[str, dict[str, str]]:
    base, _, query = spec.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    return base, params


def _dataset_table(ds, name: str, split: str | None) -> Table:
    import datasets  # heavy: only for datasets
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{name}: choose a split with ?split=NAME (it has {', '.join(ds)})")
        ds = ds[split]
    rows = ds.to_list()
    return Table(name, rows, [f"{name} row {i}" for i in range(1, len(rows) + 1)])


def read_saved(path: Path, split: str | None) -> Table:
    """A dataset written by `datasets`' save_to_disk (a Dataset, or a DatasetDict and its split)."""
    import datasets  # heavy: only for datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable save_to_disk dataset: {err}") from err
    return _dataset_table(ds, str(path), split)


def read_hub(spec: str) -> Table:
    """hf://NAME?config=C&split=S&revision=R&data_files=F -> datasets.load_dataset(NAME, C, split=S, ...).
    Works offline when the dataset is in the local Hugging Face cache (or NAME is a packaged builder such as
    json/csv/parquet with local data_files)."""
    import datasets  # heavy: only for datasets
    base, params = _query(spec)
    name = base[len(HUB):].strip("/")
    unknown = set(params) - {"config", "split", "revision", "data_files"}
    if not name or unknown:
        raise DataError(f"{spec}: expected hf://NAME?config=C&split=S&revision=R&data_files=F"
                        + (f" (unknown {', '.join(sorted(unknown))})" if unknown else ""))
    kwargs = {k: params[k] for k in ("revision", "data_files") if k in params}
    try:
        ds = datasets.load_dataset(name, params.get("config"), split=params.get("split", "train"), **kwargs)
    except Exception as err:        # the library raises many kinds: not found, offline, no cache, bad split
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise DataError(f"{spec}: cannot load {name!r} with datasets.load_dataset: it is not a local dataset and "
                        f"not in the Hugging Face cache{' (offline mode)' if offline else ''}, or the config or "
                        f"split does not exist ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from err
    return _dataset_table(ds, spec, None)


def _is_saved(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS)


def read_tables(spec: str | Path) -> list[Table]:
    """Every table of a source: a file, a folder of files, a saved dataset, or an hf:// spec."""
    spec = str(spec)
    if spec.startswith(HUB):
        return [read_hub(spec)]
    base, params = _query(spec) if "?" in spec else (spec, {})
    path = Path(base)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if _is_saved(path):
        return [read_saved(path, params.get("split"))]
    if params:
        raise DataError(f"{spec}: '?split=' applies only to a saved dataset folder or an hf:// spec")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
    else:
        files = [path]
    tables = []
    for file in files:
        if file.suffix not in SUFFIXES:
            raise DataError(f"{file}: unsupported file type {file.suffix!r} (use {', '.join(SUFFIXES)}, a folder, "
                            f"a save_to_disk dataset or hf://NAME)")
        reader = {".jsonl": read_json, ".json": read_json, ".txt": read_txt}.get(file.suffix, read_arrow)
        table = reader(file)
        if not table.rows:
            raise DataError(f"{file}: empty file (no records)")
        tables.append(table)
    return tables
