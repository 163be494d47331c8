"""Build the benchmark's task sets: per cl5 domain from its holdout side only, and one of general English.

    python benchmarks/build_tasks.py [--corpus benchmarks/corpora/cl5] [--seed 0]

Writes `<corpus>/<domain>/tasks.jsonl` for every domain and `<corpus>/general/tasks.jsonl`, then prints
how many items of each kind each set holds. Deterministic for a seed.

- continuation (every domain, multiple choice): for each holdout passage, its opening (the first
  OPEN_WORDS words, or lines for code) with its true continuation (the next CONT_WORDS words) and the
  continuations at the same place in three other holdout documents of the same domain. Holdout documents
  are disjoint from the training passages (the corpus's own rule), so no item's text was trained on.
- qa (medical, free-form): a MedQuAD question from `queries.jsonl` whose document is a holdout passage,
  with that passage's first sentences as the reference answer. The other domains' sources hold no
  question/answer pairs in this repository (CUAD's questions and answer spans are not part of cl5).
- general (multiple choice): the trivia questions of chatterbot-corpus (BSD-3-Clause, (c) Gunther Cox
  and contributors; a category the router's background leaves out), each with its answer and three answers
  to other trivia questions as distractors. Not free-form: SmolLM2-135M's greedy answers to them scored
  exact match 0.00 and token F1 0.02 (it answers in sentences), a figure that cannot move.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

import yaml

from crma.io import write_text

OPEN_WORDS, CONT_WORDS, DISTRACTORS = 48, 12, 3
REFERENCE_WORDS = 40


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cut(text: str, code: bool) -> tuple[str, str] | None:
    """(opening, the rest) of a passage: words for prose; whole lines for code (kept verbatim)."""
    if code:
        lines = text.splitlines(keepends=True)
        if len(lines) < 4:
            return None
        k = max(2, min(len(lines) - 2, len(lines) // 2))
        return "".join(lines[:k]).rstrip("\n"), "\n" + "".join(lines[k:])
    words = text.split()
    if len(words) < OPEN_WORDS + CONT_WORDS:
        return None
    return " ".join(words[:OPEN_WORDS]), " " + " ".join(words[OPEN_WORDS:])


def _continuation(rest: str, code: bool) -> str:
    if code:
        lines = rest.splitlines(keepends=True)
        return "".join(lines[:3]).rstrip("\n")                 # "\n" + the next two lines
    return " " + " ".join(rest.split()[:CONT_WORDS])


def continuation_items(holdout: list[dict], domain: str, rng: random.Random) -> list[dict]:
    code = domain == "code"
    cut = [(p, _cut(p["text"], code)) for p in holdout]
    cut = [(p, c) for p, c in cut if c is not None]
    conts = [_continuation(rest, code) for _, (_, rest) in cut]
    items = []
    for i, (p, (opening, _)) in enumerate(cut):
        others = [j for j in range(len(cut)) if cut[j][0]["doc_id"] != p["doc_id"] and conts[j] != conts[i]]
        if len(others) < DISTRACTORS:
            continue
        choices = [conts[i]] + [conts[j] for j in rng.sample(others, DISTRACTORS)]
        if len(set(choices)) < len(choices):
            continue
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append({"text": opening, "choices": [choices[k] for k in order], "answer": order.index(0),
                      "task": "continuation", "domain": domain, "doc_id": p["doc_id"], "source": p.get("source"),
                      "license": p.get("license")})
    return items


def _first_sentences(text: str, words: int) -> str:
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        out.append(sentence)
        if sum(len(s.split()) for s in out) >= words:
            break
    return " ".join(out)


def qa_items(holdout: list[dict], queries: list[dict], domain: str) -> list[dict]:
    """Free-form items: a question whose document is a holdout passage, answered by that passage."""
    by_doc = {p["doc_id"]: p for p in holdout}
    items = []
    for q in queries:
        doc = by_doc.get(q["doc_id"])
        if doc is None or q.get("source") != "MedQuAD" or not q["text"].rstrip().endswith("?"):
            continue
        items.append({"prompt": q["text"], "completion": _first_sentences(doc["text"], REFERENCE_WORDS),
                      "task": "qa", "domain": domain, "doc_id": q["doc_id"], "source": q.get("source"),
                      "license": q.get("license")})
    return items


def general_items(rng: random.Random) -> list[dict]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    path = Path(spec.origin).parent / "data" / "english" / "trivia.yml"
    pairs = [(c[0].strip(), c[1].strip()) for c in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
             if len(c) >= 2 and isinstance(c[0], str) and isinstance(c[1], str)]
    seen, unique = set(), []
    for q, a in pairs:
        if q.lower() not in seen and a:
            seen.add(q.lower())
            unique.append((q, a))
    meta = {"domain": "general", "source": "chatterbot-corpus english/trivia.yml", "license": "BSD-3-Clause"}
    items = []
    for q, a in unique:
        others = sorted({b for _, b in unique if b.lower() != a.lower()})
        choices = [a] + rng.sample(others, DISTRACTORS)
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append({"prompt": q, "choices": [choices[k] for k in order], "answer": order.index(0),
                      "task": "trivia-choice", **meta})
    return items


def write(path: Path, items: list[dict]) -> None:
    write_text(path, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path(__file__).parent / "corpora" / "cl5")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for folder in sorted(d for d in args.corpus.iterdir() if (d / "holdout.jsonl").is_file()):
        rng = random.Random(f"{args.seed}-{folder.name}")
        holdout = read_jsonl(folder / "holdout.jsonl")
        items = continuation_items(holdout, folder.name, rng)
        if (folder / "queries.jsonl").is_file():
            items += qa_items(holdout, read_jsonl(folder / "queries.jsonl"), folder.name)
        write(folder / "tasks.jsonl", items)
        kinds = {k: sum(it["task"] == k for it in items) for k in ("continuation", "qa")}
        print(f"{folder.name}: {len(items)} items ({kinds['continuation']} continuation, {kinds['qa']} qa)")
    general = general_items(random.Random(f"{args.seed}-general"))
    write(args.corpus / "general" / "tasks.jsonl", general)
    print(f"general: {len(general)} items (multiple choice)")


if __name__ == "__main__":
    main()
