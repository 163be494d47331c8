"""Task files: the items a domain's behaviour is scored on, in any source and record format crma reads.

    free-form        a conversation (messages, prompt-completion, alpaca, sharegpt) whose last assistant turn
                     is the reference answer; {"references": [...]} adds more references
                     {"text": "...", "references": ["..."]}  a raw-text context and the continuations expected
    multiple choice  any of the above for the question, plus "choices": [...] and "answer": the index of the
                     right choice (the question's own answer turn, if any, is ignored)
                     {"text": "opening ...", "choices": ["...", "..."], "answer": 0}   a continuation task

A conversational item is scored through the chat template (as `crma serve` answers it), a text item as a raw
continuation. Each item's format is detected on its own (a file may mix kinds), unless --format forces one.
Errors name the file and the line or row of the bad item.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data import DataError, Record, Table, read_tables, table_records
from ..data.formats import parse_columns

FREE, CHOICE = "free", "choice"


@dataclass(frozen=True)
class TaskItem:
    """One scored item: the question (a raw-text context or the conversation before the answer) and either
    reference answers (free-form) or choices with the index of the right one (multiple choice)."""

    origin: str
    kind: str                                   # FREE or CHOICE
    context: str | None = None                  # raw-text items
    messages: tuple[dict, ...] = ()             # conversational items: the turns before the answer
    references: tuple[str, ...] = ()            # free-form
    choices: tuple[str, ...] = ()               # multiple choice
    answer: int = -1                            # index into choices

    def query(self) -> str:
        """What the router sees for this item: the context, or the last user turn."""
        if self.context is not None:
            return self.context
        return [m["content"] for m in self.messages if m["role"] == "user"][-1]


def _strings(value, origin: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{origin}: {name!r} must be a non-empty list of strings, got {value!r:.80}")
    return tuple(value)


def _question(record: Record) -> tuple[str | None, tuple[dict, ...], str | None]:
    """(context, turns before the final answer, the final answer) of a record."""
    if record.text is not None:
        return record.text, (), None
    return None, record.messages[:-1], record.messages[-1]["content"]


def to_item(row: dict, record: Record) -> TaskItem:
    """A task item from a table row and the Record crma's formats made of it."""
    origin = record.origin
    context, turns, answer = _question(record)
    if record.text is None and record.messages[-1]["role"] != "assistant":    # a question without its answer
        context, turns, answer = None, record.messages, None
    if "choices" in row:
        choices = _strings(row["choices"], origin, "choices")
        right = row.get("answer")
        if isinstance(right, bool) or not isinstance(right, int) or not 0 <= right < len(choices):
            raise DataError(f"{origin}: 'answer' must be the index of the right choice (0 to {len(choices) - 1}), "
                            f"got {right!r:.40}")
        if len(choices) < 2 or len(set(choices)) != len(choices):
            raise DataError(f"{origin}: 'choices' needs at least 2 different choices, got {len(choices)}")
        return TaskItem(origin, CHOICE, context, turns, choices=choices, answer=right)
    refs = _strings(row["references"], origin, "references") if "references" in row else ()
    refs = ((answer,) if answer is not None else ()) + tuple(r for r in refs if r != answer)
    if not refs:
        raise DataError(f"{origin}: a free-form item needs a reference answer (a final assistant turn, a "
                        f"completion/output, or 'references'); a multiple-choice item needs 'choices' and 'answer'")
    return TaskItem(origin, FREE, context, turns, references=refs)


def read_tasks(source, fmt: str = "auto", columns: str = "") -> list[TaskItem]:
    """Every item of a task source (file, folder, saved dataset, hf:// spec)."""
    mapping = parse_columns(columns)
    items = []
    for table in read_tables(source):
        if table.rows and not isinstance(table.rows[0], dict):
            raise DataError(f"{table.origins[0]}: a task item must be an object (a .txt file has no answers)")
        for row, origin in zip(table.rows, table.origins):    # task files mix kinds: the format of each row
            one = Table(table.name, [row], [origin])
            items.append(to_item({mapping.get(k, k): v for k, v in row.items()},
                                 table_records(one, fmt, mapping, need_answer=False)[0]))
    if not items:
        raise DataError(f"{source}: no task items")
    return items
