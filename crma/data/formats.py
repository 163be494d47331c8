"""Record formats: what one row of a table means, decided per table and overridable with --format.

    text               {"text": "..."}                                          continued pre-training
    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
    prompt-completion  {"prompt": "...", "completion": "..."}                   (as TRL)
    alpaca             {"instruction": "...", "input": "...", "output": "..."}
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}

A column mapping (`--columns prompt=question,completion=answer`) renames a table's columns to these fields
first. Everything but `text` becomes a conversation (`Record.messages`): an optional system turn, then
user and assistant turns alternating, ending with an assistant turn (the answer). Plain-text files (.txt)
are always `text`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sources import DataError, Table

FORMATS = ("auto", "text", "messages", "prompt-completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant"}
FIELDS = {"text": ("text",), "messages": ("messages",), "prompt-completion": ("prompt", "completion"),
          "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
QUESTION_FIELDS = {**FIELDS, "prompt-completion": ("prompt",), "alpaca": ("instruction",)}  # no answer needed
TASK_FIELDS = ("choices", "answer", "references")    # task files (crma/tasks/items.py)
ACCEPTED = ("text (a 'text' string), messages (a list of {role, content}), prompt-completion ('prompt' and "
            "'completion'), alpaca ('instruction', optional 'input', 'output'), sharegpt ('conversations': a list "
            "of {from, value}); map other column names with --columns FIELD=COLUMN,...")


@dataclass(frozen=True)
class Record:
    """One training or evaluation record: a passage of text, or a conversation."""

    origin: str                                   # file:line or file row N
    text: str | None = None                       # a raw-text record
    messages: tuple[dict, ...] = ()               # a conversation: {"role", "content"} turns

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def canonical(self) -> str:
        """The record as one string: its checksum, deduplication and replay key."""
        if self.text is not None:
            return self.text
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)

    def user_turns(self) -> list[str]:
        """What a query to this domain looks like: the text itself, or the user turns of a conversation."""
        return [self.text] if self.text is not None else [m["content"] for m in self.messages if m["role"] == "user"]

    def query(self) -> str:
        """The text the router sees for this record as a request: the text, or the last user turn."""
        return self.user_turns()[-1]


def parse_columns(spec: str) -> dict[str, str]:
    """'prompt=question,completion=answer' -> {"question": "prompt", "answer": "completion"} (column -> field)."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        field, sep, column = part.partition("=")
        known = {f for fs in FIELDS.values() for f in fs} | {"input", "system", *TASK_FIELDS}
        if not sep or not field or not column:
            raise DataError(f"--columns: expected FIELD=COLUMN[,FIELD=COLUMN...], got {part!r}")
        if field not in known:
            raise DataError(f"--columns: unknown field {field!r}; fields: {', '.join(sorted(known))}")
        mapping[column] = field
    return mapping


def detect(row, mapping: dict[str, str], need_answer: bool = True) -> str | None:
    """The format a row's fields fit, or None. Without need_answer (queries, task questions), a prompt or an
    instruction alone fits."""
    if isinstance(row, str):
        return "text"
    if not isinstance(row, dict):
        return None
    keys = {mapping.get(k, k) for k in row}
    fields = FIELDS if need_answer else QUESTION_FIELDS
    for fmt in ("messages", "prompt-completion", "alpaca", "sharegpt", "text"):
        if all(f in keys for f in fields[fmt]):
            return fmt
    return None


def _string(value, where: str, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{where}: {name} must be a non-empty string, got {value!r:.60}")
    return value


def _turns(turns, where: str, role_key: str, content_key: str, roles: dict, need_answer: bool) -> tuple[dict, ...]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns, got {turns!r:.60}")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            found = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise DataError(f"{where}: turn {i} must be an object with {role_key!r} and {content_key!r} "
                            f"(found {found})")
        role = roles.get(turn[role_key])
        if role is None:
            raise DataError(f"{where}: turn {i} has role {turn[role_key]!r}; roles: {', '.join(roles)}")
        out.append({"role": role, "content": _string(turn[content_key], where, f"turn {i} ({role}) content")})
    check_order(out, where, need_answer)
    return tuple(out)


def check_order(turns: list[dict], where: str, need_answer: bool = True) -> None:
    """An optional system turn, then user and assistant alternating from user; ending with assistant when
    an answer is needed (training, evaluation), with user otherwise (a query)."""
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != want:
            at = i + 1 + (len(turns) - len(body))
            raise DataError(f"{where}: turn {at} has role {turn['role']!r} where {want!r} was expected (an optional "
                            f"system turn, then user and assistant alternating)")
    if not body:
        raise DataError(f"{where}: a conversation needs a user turn")
    if need_answer and body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (the answer to train on)")


def to_record(row, fmt: str, origin: str, mapping: dict[str, str], need_answer: bool = True) -> Record:
    """One row in format `fmt` -> Record, or DataError naming the origin, the fields found and what fits."""
    if fmt == "text" and isinstance(row, str):
        return Record(origin, text=row)
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected an object, got {type(row).__name__}; formats: {ACCEPTED}")
    rec = {mapping.get(k, k): v for k, v in row.items()}
    missing = [f for f in (FIELDS if need_answer else QUESTION_FIELDS)[fmt] if rec.get(f) is None]
    if missing:
        raise DataError(f"{origin}: record has no {' or '.join(repr(f) for f in missing)} field for format {fmt} "
                        f"(fields found: {', '.join(sorted(row)) or 'none'}); formats: {ACCEPTED}")
    if fmt == "text":
        return Record(origin, text=_string(rec["text"], origin, "'text'"))
    if fmt == "messages":
        return Record(origin, messages=_turns(rec["messages"], origin, "role", "content", {r: r for r in ROLES},
                                              need_answer))
    if fmt == "sharegpt":
        return Record(origin, messages=_turns(rec["conversations"], origin, "from", "value", SHAREGPT_ROLES,
                                              need_answer))
    system = [{"role": "system", "content": _string(rec["system"], origin, "'system'")}] if rec.get("system") else []
    if fmt == "alpaca":
        extra = _string(rec.get("input") or "", origin, "'input'", allow_empty=True)
        user = _string(rec["instruction"], origin, "'instruction'") + (f"\n\n{extra}" if extra.strip() else "")
        answer = rec.get("output")
    else:
        prompt, answer = rec["prompt"], rec.get("completion")
        if isinstance(prompt, list):         # TRL's conversational prompt/completion
            turns = list(_turns(prompt, origin, "role", "content", {r: r for r in ROLES}, need_answer=False))
            if answer is None and not need_answer:
                return Record(origin, messages=tuple(turns))
            if isinstance(answer, list):
                answer = answer[-1].get("content") if answer and isinstance(answer[-1], dict) else None
            msgs = turns + [{"role": "assistant", "content": _string(answer, origin, "'completion'")}]
            check_order(msgs, origin)
            return Record(origin, messages=tuple(msgs))
        user = _string(prompt, origin, "'prompt'")
    turns = system + [{"role": "user", "content": user}]
    if answer is None and not need_answer:          # a question without its answer (a query, a task item)
        return Record(origin, messages=tuple(turns))
    name = "'output'" if fmt == "alpaca" else "'completion'"
    return Record(origin, messages=tuple(turns + [{"role": "assistant", "content": _string(answer, origin, name)}]))


def table_records(table: Table, fmt: str = "auto", columns: str | dict = "", domain: str | None = None,
                  need_answer: bool = True) -> list[Record]:
    """Every row of `table` as a Record. `fmt` 'auto' takes the format the table's first row fits; every row
    must then fit it. A `domain` field, where present, must equal `domain`."""
    if fmt not in FORMATS:
        raise DataError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    mapping = parse_columns(columns) if isinstance(columns, str) else columns
    if table.rows and isinstance(table.rows[0], str):
        fmt = "text"
    elif fmt == "auto" and table.rows:
        fmt = detect(table.rows[0], mapping, need_answer)
        if fmt is None:
            row = table.rows[0]
            found = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{table.origins[0]}: record fits no format (fields found: {found or 'none'}); "
                            f"formats: {ACCEPTED}")
    out = []
    for row, origin in zip(table.rows, table.origins, strict=True):
        if domain is not None and isinstance(row, dict) and "domain" in row and row["domain"] != domain:
            raise DataError(f"{origin}: record is from domain {row['domain']!r}, but this file was given for "
                            f"domain {domain!r}")
        out.append(to_record(row, fmt, origin, mapping, need_answer))
    return out
