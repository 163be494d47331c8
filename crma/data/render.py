"""Rendering conversations: the one code path from turns to the text a model sees, in training and serving.

A model with a chat template (tokenizer.chat_template) renders through it; a model without one through the
plain template:

    system: {content}\\n        user: {content}\\n        assistant: {content}{eos}\\n

and a generation prompt of `assistant:`. The rendered prompt is tokenised without added special tokens
(the template writes them), exactly as `crma generate` and `crma serve` do (`prompt_ids`). Training on a
conversation cuts its rendering into segments at each assistant turn: the text before each answer is what
the server would render as the prompt for it, and the answer is the difference to the next rendering.
"""
from __future__ import annotations

import warnings


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict] | tuple[dict, ...], generation_prompt: bool) -> str:
    """The conversation as text, with the assistant's generation prompt appended when asked."""
    messages = [dict(m) for m in messages]
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    eos = tokenizer.eos_token or ""
    text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
    return text + ("assistant:" if generation_prompt else "")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next assistant turn after `messages` (what generation starts from)."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of raw text (no template), with the tokenizer's own special tokens (e.g. BOS)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


_warned: set[int] = set()
_skeletons: dict[tuple, list | None] = {}
MARK = "\x1f{}\x1f"                    # a content placeholder no chat template changes


def segments(tokenizer, messages: tuple[dict, ...], answers: str = "all") -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the rendered conversation. Each answer piece runs from
    the end of the rendered prompt before an assistant turn to the end of the rendering with that turn.
    `answers`: 'all' marks every assistant turn, 'last' only the final one.

    Fast path: the pieces of a conversation with the same roles, rendered once with placeholders, filled
    with this conversation's contents, and accepted only when they join to exactly its full rendering."""
    key = (id(tokenizer), (getattr(tokenizer, "chat_template", None) or "") + (tokenizer.eos_token or ""),
           tuple(m["role"] for m in messages))
    if key not in _skeletons:
        _skeletons[key] = _skeleton(tokenizer, key[2])
    skeleton = _skeletons[key]
    if skeleton is not None:
        pieces = [("".join(p if isinstance(p, str) else messages[p]["content"] for p in parts), marked)
                  for parts, marked in skeleton]
        if "".join(text for text, _ in pieces) == render(tokenizer, messages, False):
            return _mark(pieces, answers)
    return _mark(exact_segments(tokenizer, messages), answers)


def _mark(pieces: list[tuple[str, bool]], answers: str) -> list[tuple[str, bool]]:
    if answers == "all":
        return pieces
    last = max(i for i, (_, marked) in enumerate(pieces) if marked)
    return [(text, marked and i == last) for i, (text, marked) in enumerate(pieces)]


def _skeleton(tokenizer, roles: tuple[str, ...]) -> list | None:
    """The pieces of a conversation with these roles, each a list of literal strings and content indices."""
    probe = tuple({"role": r, "content": MARK.format(i)} for i, r in enumerate(roles))
    try:
        pieces = exact_segments(tokenizer, probe)
    except Exception:                 # a template that refuses placeholder contents: no fast path
        return None
    out, seen = [], []
    for text, marked in pieces:
        parts = []
        for k, chunk in enumerate(text.split("\x1f")):
            if k % 2 == 0:
                parts.append(chunk)
            elif chunk.isdigit() and int(chunk) < len(roles):
                parts.append(int(chunk))
                seen.append(int(chunk))
            else:
                return None
        out.append((parts, marked))
    return out if sorted(seen) == list(range(len(roles))) else None


def exact_segments(tokenizer, messages: tuple[dict, ...]) -> list[tuple[str, bool]]:
    """segments() by rendering every prefix of the conversation: (text, is_answer) for every assistant turn."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], True)
        full = render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            if id(tokenizer) not in _warned:          # a template that rewrites earlier turns (rare)
                _warned.add(id(tokenizer))
                warnings.warn("the chat template does not render conversations prefix by prefix; answers are "
                              "marked by the longest common prefix", stacklevel=2)
            common = 0
            while common < min(len(prompt), len(full)) and prompt[common] == full[common]:
                common += 1
            prompt = full[:common]
            if not prompt.startswith(done):
                out, done = [], ""
        if prompt[len(done):]:
            out.append((prompt[len(done):], False))
        out.append((full[len(prompt):], True))
        done = full
    return out
