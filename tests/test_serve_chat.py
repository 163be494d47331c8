"""A domain added from chat conversations answers through `crma serve`'s chat endpoint as `crma generate`
does: trained on the answers only, rendered the way the server renders prompts."""
from __future__ import annotations

import json
import random

from crma.cli import main
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.store import Store
from tests.test_serve import client, serving


def _cycle_rate(text: str, cycle: str = "abcd") -> float:
    """Share of adjacent character pairs in `text` that follow `cycle` (a -> b -> c -> d -> a)."""
    pairs = list(zip(text, text[1:]))
    nxt = {cycle[k]: cycle[(k + 1) % len(cycle)] for k in range(len(cycle))}
    return sum(nxt.get(a) == b for a, b in pairs) / max(len(pairs), 1)


def test_a_domain_added_from_conversations_answers_through_the_chat_endpoint(tmp_path):
    """`crma add` from a file of OpenAI-style `messages` conversations trains on the answers only, in the form the
    server renders them; the `openai` client then gets, through /v1/chat/completions, the adapter's greedy answer
    (the same text `crma generate` gives for those messages) and that answer follows the trained pattern far
    more than the base model's does."""
    rng = random.Random(3)

    def conversation(k: int) -> dict:
        start = rng.randrange(4)
        answer = "".join("abcd"[(start + j) % 4] for j in range(rng.randrange(24, 32)))
        return {"messages": [{"role": "system", "content": "reply in the cycle"},
                             {"role": "user", "content": f"xyzw {k} zwxy"},
                             {"role": "assistant", "content": answer}]}

    train, hold = tmp_path / "chats.jsonl", tmp_path / "chats_hold.jsonl"
    train.write_text("".join(json.dumps(conversation(k)) + "\n" for k in range(32)))
    hold.write_text("".join(json.dumps(conversation(100 + k)) + "\n" for k in range(6)))
    root = tmp_path / "store"
    assert main(["add", "--store", str(root), "--domain", "chat", "--data", f"{train}:{hold}", "--model",
                 "tiny:llama", "--epochs", "4", "--lr", "1e-2", "--batch-size", "8", "--max-len", "96"]) == 0
    meta = Store(root).adapter_meta("chat")
    stats = meta["data"]["train"]["stats"]
    assert meta["train"]["format"] in ("auto", "messages") and meta["train"]["loss_on"] == "completion"
    assert stats["records"] == 32 and 0 < stats["tokens_trained"] < stats["tokens_read"]     # answers only
    assert meta["holdout_loss"] < meta["base_loss"]

    question = [{"role": "system", "content": "reply in the cycle"}, {"role": "user", "content": "xyzw 7 zwxy"}]
    ref = LiveModel.open(Store(root))
    want = generate(ref, question[-1]["content"], domain="chat", temperature=0, max_new_tokens=24,
                    messages=question)
    base = generate(ref, question[-1]["content"], domain="base", temperature=0, max_new_tokens=24,
                    messages=question)
    with serving(root) as (url, _):
        got = client(url).chat.completions.create(model="chat", messages=question, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want.text and got.crma["domain"] == "chat"
    assert _cycle_rate(want.text) > 0.8 > _cycle_rate(base.text) + 0.3, (want.text, base.text)
