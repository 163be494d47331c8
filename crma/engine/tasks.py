"""Scoring task items on a live model: greedy answers for free-form items, log-likelihoods for choices.

    score = score_tasks(live, read_tasks("medical_qa.jsonl"), domain="medical")      # or "auto", "base"
    score.score, score.metrics["token_f1"], score.metrics["accuracy_norm"]

A free-form item is answered greedily through the path `crma generate` uses (the prompt rendered by
crma.data.render, the domain's adapter on its backbone version), in left-padded batches. A multiple-choice
item is scored without generating: the log-likelihood of each choice after the question, summed over the
choice's tokens, with the question encoded once and its key/value cache repeated for the choices (equal to
scoring each question + choice row whole, which a test checks). With domain 'auto' the router picks each
item's adapter from its question, as it would pick for a user's request.

The headline `score` of a task set is the mean over its items of one number per item: for a multiple-choice
item, whether the length-normalised pick is right; for a free-form item, its token F1.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import runtime
from ..config import ConfigError, TaskConfig
from ..data import Example, prompt_ids, text_ids
from ..routing import BASE, route_texts
from ..tasks import CHOICE, FREE, TaskItem, choice_picks, free_form_scores, read_tasks
from .generate import AUTO
from .live import LiveModel
from .loss import passage_losses


@dataclass
class TaskSet:
    """A named task file, read: what `crma add --tasks` and `crma eval --tasks` score."""

    name: str
    source: str
    items: list[TaskItem]

    @classmethod
    def load(cls, name: str, source: str) -> TaskSet:
        return cls(name, str(source), read_tasks(source))

    def sha256(self) -> str:
        """Checksum of the items' content (not of the file's bytes): the same items score the same."""
        digest = hashlib.sha256()
        for it in self.items:
            digest.update(json.dumps([it.kind, it.context, list(it.messages), list(it.references),
                                      list(it.choices), it.answer], ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()

    def record(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256(), "items": len(self.items)}


def parse_min_score(value: str | float | None) -> float | str | None:
    """--min-task-score: a number in [0, 1], 'base' (at least the base model's score) or None (no gate)."""
    if value is None or value == "base":
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--min-task-score: expected a number in [0, 1] or 'base', got {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"--min-task-score: expected a number in [0, 1] or 'base', got {value!r}")
    return x


@dataclass
class TaskScore:
    """One task set scored one way (domain, backbone)."""

    task: str
    domain: str                    # what was asked: a domain, auto or base
    backbone: str
    items: int
    score: float                   # mean per-item score (see the module docstring)
    metrics: dict = field(default_factory=dict)   # exact_match, token_f1, rouge_l, accuracy, accuracy_norm
    served: dict = field(default_factory=dict)    # domain -> items it served (auto: the router's choices)
    seconds: float = 0.0

    def record(self) -> dict:
        return asdict(self)


def _question_ids(item: TaskItem, tokenizer) -> list[int]:
    """The prompt an item's answer follows: the rendered conversation's generation prompt, or the raw text."""
    if item.context is not None:
        return text_ids(tokenizer, item.context)
    return prompt_ids(tokenizer, list(item.messages))


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   progress: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded in batches; special tokens removed."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="answer", leave=False, disable=not progress):
        rows = prompts[start:start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)                         # (b, s)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=None, top_p=None,
                             top_k=None)                                                      # (b, s + new)
        out += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in gen]
    return out


@torch.no_grad()
def _one_item(model, question: list[int], conts: list[list[int]], pad: int, device) -> list[float] | None:
    """log p(cont | question) for every continuation, the question encoded once: its key/value cache is
    repeated for the continuations. None when the model's cache cannot be repeated (then rows are scored whole).

        log p(c | q) = log p(c_0 | q) + sum_{k>=1} log p(c_k | q, c_<k)"""
    out = model(input_ids=torch.tensor([question], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)                                 # (V,): each c_0
    cache = out.cache
    scores = [float(first[c[0]]) for c in conts]
    width = max(map(len, conts)) - 1
    if width == 0:
        return scores
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(len(conts))
    rest = torch.full((len(conts), width), pad, dtype=torch.long)                      # (C, w): c_0..c_{n-2}
    mask = torch.ones((len(conts), len(question) + width), dtype=torch.long)           # (C, q + w)
    for r, c in enumerate(conts):
        rest[r, : len(c) - 1] = torch.tensor(c[:-1])
        mask[r, len(question) + len(c) - 1:] = 0
    logp = model(input_ids=rest.to(device), attention_mask=mask.to(device), cache=cache,
                 use_cache=True).logits.float().log_softmax(-1)                        # (C, w, V)
    for r, c in enumerate(conts):
        if len(c) > 1:
            scores[r] += float(logp[r, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
    return scores


def _choice_logliks(model, tokenizer, items: list[TaskItem], cfg: TaskConfig, progress: bool) -> list[list[float]]:
    """log p(choice | question) summed over the choice's tokens, for every choice of every item (the question
    encoded once per item; whole rows through passage_losses where the cache cannot be shared)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[float]] = []
    for item in tqdm(items, desc="choices", leave=False, disable=not progress):
        q = _question_ids(item, tokenizer)
        conts = [tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
                 for c in item.choices]
        got = _one_item(model, q, conts, pad, device)
        if got is None:
            rows = [Example(q + c, ((len(q), len(q) + len(c)),)) for c in conts]
            got = [-s for s, _ in passage_losses(model, rows, cfg.batch_size, pad, progress=False)]
        out.append(got)
    return out


def score_with(serving, tokenizer, items: list[TaskItem], cfg: TaskConfig, progress: bool) -> list[dict]:
    """Per-item results for items all served by one model state: `serving()` is a context yielding it."""
    free = [i for i, it in enumerate(items) if it.kind == FREE]
    choice = [i for i, it in enumerate(items) if it.kind == CHOICE]
    results: list[dict] = [{} for _ in items]
    with serving() as model:
        was_training = model.training
        model.eval()
        if free:
            shard = [free[i] for i in runtime.shard(len(free))]
            prompts = [_question_ids(items[i], tokenizer) for i in shard]
            answers = runtime.gather(greedy_answers(model, tokenizer, prompts, cfg.max_new_tokens,
                                                    cfg.batch_size, progress and runtime.is_main()))
            for i, answer in zip(free, answers):
                scores = free_form_scores(answer, items[i].references)
                results[i] = {"answer": answer, **scores, "score": scores["token_f1"]}
        if choice:
            logliks = _choice_logliks(model, tokenizer, [items[i] for i in choice], cfg, progress)
            for i, ll in zip(choice, logliks):
                raw, norm = choice_picks(ll, list(items[i].choices))
                right = items[i].answer
                results[i] = {"loglik": ll, "pick": raw, "pick_norm": norm, "accuracy": float(raw == right),
                              "accuracy_norm": float(norm == right), "score": float(norm == right)}
        model.train(was_training)
    return results


def summarise(task: str, domain: str, backbone: str, items: list[TaskItem], per_item: list[dict],
              served: dict, seconds: float) -> TaskScore:
    """A TaskScore from per-item results (score_with)."""
    metrics = {}
    for name in ("exact_match", "token_f1", "rouge_l", "accuracy", "accuracy_norm"):
        values = [r[name] for r in per_item if name in r]
        if values:
            metrics[name] = sum(values) / len(values)
    metrics["free_form_items"] = sum(it.kind == FREE for it in items)
    metrics["choice_items"] = sum(it.kind == CHOICE for it in items)
    score = sum(r["score"] for r in per_item) / len(per_item)
    return TaskScore(task, domain, backbone, len(items), score, metrics, served, round(seconds, 3))


def check_sharding(items: list[TaskItem], sharded: bool | None = None) -> None:
    """Free-form items cannot be scored on a sharded base (--fsdp): ConfigError."""
    sharded = runtime.base_sharded() if sharded is None else sharded
    if sharded and any(it.kind == FREE for it in items):
        raise ConfigError("free-form task items generate on each process apart, which a sharded base (--fsdp) "
                          "cannot do; score them without --fsdp")


def score_model(model, tokenizer, items: list[TaskItem], *, task: str = "", label: str = "", cfg: TaskConfig | None
                = None, progress: bool = True, serving=None) -> TaskScore:
    """Score `items` on the model as it stands (`serving()`: a context yielding it; default: `model` itself)."""
    check_sharding(items)
    started = time.perf_counter()
    per_item = score_with(serving or (lambda: nullcontext(model)), tokenizer, items, cfg or TaskConfig(), progress)
    return summarise(task, label, "", items, per_item, {label: len(items)}, time.perf_counter() - started)


def score_tasks(live: LiveModel, items: list[TaskItem], *, task: str = "", domain: str = AUTO,
                backbone: str = "pinned", cfg: TaskConfig | None = None, progress: bool = True) -> TaskScore:
    """Score `items` as a store serves them: by `domain` (a domain; 'auto': the router's pick per item, from
    its question; 'base': no adapter) on the backbone version `backbone` says."""
    cfg = cfg or TaskConfig()
    check_sharding(items)
    started = time.perf_counter()
    if domain == AUTO:
        router = live.store.router() if live.store is not None else None
        if router is None or not router.names:
            picks = [BASE] * len(items)
        else:
            picks = [d.domain for d in route_texts(router, live.model, live.tokenizer, [it.query() for it in items])]
        groups: dict[str | None, list[int]] = {}
        for i, d in enumerate(picks):
            groups.setdefault(None if d == BASE else d, []).append(i)
    else:
        groups = {None if domain == BASE else domain: list(range(len(items)))}
    per_item: list[dict] = [{} for _ in items]
    served = {}
    for target, idx in groups.items():
        got = score_with(lambda t=target: live.using(t, backbone), live.tokenizer, [items[i] for i in idx], cfg,
                         progress)
        for i, r in zip(idx, got):
            per_item[i] = r
        served[target or BASE] = len(idx)
    return summarise(task, domain, backbone, items, per_item, served, time.perf_counter() - started)
