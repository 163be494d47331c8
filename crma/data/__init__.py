"""Domain data: sources (files, folders, datasets), record formats, chat rendering, examples and batches.

    sources.py   files, folders, saved datasets, hf:// specs -> tables of rows, each row's origin
    formats.py   rows -> Records (text, or a conversation), format detection and column mapping
    render.py    conversations -> the text a model sees (chat template or the plain template)
    examples.py  Records -> Examples (token ids, the spans carrying the loss), windows, batches
    domain.py    one domain's train and holdout data, the split, duplicates, statistics
"""
from pathlib import Path

from .domain import DomainData, examples_for, load_domain, read_queries, read_records, read_texts, split_holdout
from .examples import DataStats, Example, build_examples, collate, epoch_order, text_example, windows
from .formats import Record, table_records
from .render import prompt_ids, render, text_ids
from .sources import DataError, Table, read_tables

DEMO_DIR = Path(__file__).parent.parent / "demo_data"    # the bundled demo domains (crma demo, smoke benchmark)

__all__ = ["DEMO_DIR", "DataError", "DataStats", "DomainData", "Example", "Record", "Table", "build_examples",
           "collate", "epoch_order", "examples_for", "load_domain", "prompt_ids", "read_queries", "read_records",
           "read_tables", "read_texts", "render", "split_holdout", "table_records", "text_example", "text_ids",
           "windows"]
