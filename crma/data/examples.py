"""From records to training examples: token ids, which tokens carry the loss, and what was left out.

Raw text is tokenised with the tokenizer's special tokens. Under `long_inputs='window'` a document longer
than max_len becomes consecutive windows of max_len tokens, each starting `stride` tokens before the
previous one ended; the overlap is context only (no loss), so every token after the first of the document is
predicted once when stride > 0, and every token lies in exactly one window at stride 0. Under 'truncate' a
document keeps its first max_len tokens (the benchmark protocols' policy).

A conversation is rendered (crma/data/render.py), its answer tokens carry the loss (`loss_on='completion'`)
or all of them do ('all'). One longer than max_len loses turns from the left and keeps its final answer, or
is dropped when that answer alone does not fit.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .formats import Record
from .render import segments

IGNORE = -100
LONG_INPUTS = ("window", "truncate")
LOSS_ON = ("completion", "all")


@dataclass(frozen=True, slots=True)
class Example:
    """One training row: token ids and the [start, end) spans of positions whose tokens carry the loss
    (position 0 never does: nothing predicts it)."""

    ids: list[int]
    spans: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> int:
        return sum(max(0, end - max(start, 1)) for start, end in self.spans)

    def labels(self) -> list[int]:
        out = [IGNORE] * len(self.ids)
        for start, end in self.spans:
            out[start:end] = self.ids[start:end]
        return out


def text_example(ids: list[int]) -> Example:
    return Example(list(ids), ((0, len(ids)),))


@dataclass
class DataStats:
    """What became of one side (train or holdout) of a domain's data."""

    records: int = 0
    examples: int = 0
    tokens_read: int = 0                 # tokens of every record as rendered and tokenised
    tokens_trained: int = 0              # tokens that carry the loss (predicted targets)
    tokens_dropped: dict[str, int] = field(default_factory=dict)   # reason -> tokens in no example
    records_dropped: dict[str, int] = field(default_factory=dict)  # reason -> records that made no example
    duplicates_removed: int = 0          # holdout records also on the train side (removed)

    def drop(self, reason: str, tokens: int, record: bool = False) -> None:
        if tokens:
            self.tokens_dropped[reason] = self.tokens_dropped.get(reason, 0) + tokens
        if record:
            self.records_dropped[reason] = self.records_dropped.get(reason, 0) + 1

    def line(self) -> str:
        dropped = sum(self.tokens_dropped.values())
        why = "; ".join(f"{n} {r}" for r, n in self.tokens_dropped.items())
        return (f"{self.records} records -> {self.examples} examples, {self.tokens_read} tokens read, "
                f"{self.tokens_trained} trained on, {dropped} dropped" + (f" ({why})" if why else ""))


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first target) of each window over n tokens: [start, end) with end - start <= max_len,
    consecutive windows overlapping by `stride` tokens, which are context only in the later window."""
    step = max_len - stride
    out, start = [], 0
    while True:
        end = min(n, start + max_len)
        out.append((start, end, start if start == 0 else start + stride))
        if end >= n:
            return out
        start += step


def _text_examples(ids: list[int], max_len: int, long_inputs: str, stride: int,
                   stats: DataStats) -> list[Example]:
    if len(ids) <= max_len or long_inputs == "truncate":
        stats.drop("cut at max_len (long_inputs=truncate)", max(0, len(ids) - max_len))
        ex = text_example(ids[:max_len])
        if ex.predicted == 0:
            stats.drop("record shorter than 2 tokens", len(ex), record=True)
            return []
        return [ex]
    out = []
    for start, end, first in windows(len(ids), max_len, stride):
        ex = Example(ids[start:end], ((first - start, end - start),))
        if ex.predicted == 0:               # a 1-token tail at stride 0: nothing in its window predicts it
            stats.drop("1-token window tail", end - first)
            continue
        out.append(ex)
    return out


def _chat_example(pieces: list[list[int]], answer: list[bool], max_len: int, stats: DataStats) -> Example | None:
    ids, spans = [], []
    for toks, marked in zip(pieces, answer, strict=True):
        if marked and toks:
            spans.append((len(ids), len(ids) + len(toks)))
        ids.extend(toks)
    if len(ids) <= max_len:
        return Example(ids, tuple(spans))
    final = spans[-1][1] - spans[-1][0] if spans else 0
    if final + 1 > max_len:                # the final answer and one token of context must fit
        stats.drop("conversation whose final answer is longer than max_len", len(ids), record=True)
        return None
    cut = len(ids) - max_len
    stats.drop("conversation turns cut from the left at max_len", cut)
    kept = tuple((max(0, s - cut), e - cut) for s, e in spans if e - cut > 0)
    return Example(ids[cut:], kept)


def build_examples(records: list[Record], tokenizer, max_len: int, long_inputs: str = "window", stride: int = 0,
                   loss_on: str = "completion") -> tuple[list[Example], list[int], DataStats]:
    """(examples, the index of each example's record, stats). Tokenisation is batched over all records."""
    stats = DataStats(records=len(records))
    texts = [i for i, r in enumerate(records) if not r.is_chat]
    chats = [i for i, r in enumerate(records) if r.is_chat]
    text_ids = {}
    if texts:
        batch = tokenizer([records[i].text for i in texts], add_special_tokens=True)["input_ids"]
        long = [k for k, ids in enumerate(batch) if len(ids) > max_len]
        if long_inputs == "truncate" and long:   # the tokenizer's own truncation, as the protocols always had it
            cut = tokenizer([records[texts[k]].text for k in long], truncation=True, max_length=max_len,
                            add_special_tokens=True)["input_ids"]
            for k, ids in zip(long, cut, strict=True):
                stats.drop("cut at max_len (long_inputs=truncate)", len(batch[k]) - len(ids))
                batch[k] = ids
        text_ids = dict(zip(texts, batch, strict=True))
    chat_pieces = {}
    if chats:
        split = [segments(tokenizer, records[i].messages) for i in chats]
        flat = [text for segs in split for text, _ in segs]
        toks = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        at = 0
        for i, segs in zip(chats, split, strict=True):
            chat_pieces[i] = (toks[at:at + len(segs)], [m or loss_on == "all" for _, m in segs])
            at += len(segs)
    examples, origin = [], []
    for i in range(len(records)):
        if i in text_ids:
            ids = text_ids[i]
            stats.tokens_read += len(ids)
            made = _text_examples(ids, max_len, long_inputs, stride, stats)
        else:
            pieces, marks = chat_pieces[i]
            stats.tokens_read += sum(map(len, pieces))
            ex = _chat_example(pieces, marks, max_len, stats)
            made = [ex] if ex is not None and ex.predicted else []
            if ex is not None and not ex.predicted:
                stats.drop("conversation with no answer tokens", len(ex), record=True)
        examples.extend(made)
        origin.extend([i] * len(made))
    stats.examples = len(examples)
    stats.tokens_trained = sum(ex.predicted for ex in examples)
    return examples, origin, stats


def epoch_order(n: int, epochs: int, seed: int) -> list[int]:
    """Example order for all epochs: one seeded shuffle per epoch. Same for every condition."""
    rng = random.Random(seed)
    order = []
    for _ in range(epochs):
        idx = list(range(n))
        rng.shuffle(idx)
        order.extend(idx)
    return order


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples: input_ids, attention_mask and labels, each (batch, longest). Labels are -100 on
    padding and on tokens that carry no loss; the loss reads labels[:, 1:] against logits[:, :-1]."""
    width = max(len(x) for x in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, x in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x.ids)
        mask[row, : len(x)] = 1
        labels[row, : len(x)] = torch.tensor(x.labels())
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
