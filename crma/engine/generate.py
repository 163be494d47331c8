"""Generating text from a store: route the prompt (or take the domain given), activate that domain's
adapter on its backbone version, and decode with transformers' `generate`, streaming as it goes.

    crma generate --store DIR [--domain NAME|auto|base] [--backbone pinned|latest] "prompt"
    Store(DIR).generate("What is a red giant?", on_text=print)       # the same, from Python
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from ..data import prompt_ids, text_ids
from ..routing import BASE, route_texts
from ..store import StoreError
from .live import LiveModel

AUTO = "auto"


@dataclass
class Generation:
    text: str
    domain: str                     # the domain that served it, or "base"
    confidence: float | None        # the router's confidence (None when the domain was given)
    runner_up: str | None
    adapter_version: int | None
    backbone_version: int | None
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str              # "stop" (end of text or a stop string) or "length"


class _Callback(TextStreamer):
    """TextStreamer that hands each finished piece of text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.on_text(text)


def encode_prompt(prompt: str, tokenizer, raw: bool = False, messages: list[dict] | None = None) -> torch.Tensor:
    """Prompt token ids (1, s): the conversation (or one user turn) rendered as the server and training render it
    (crma.data.render), or the plain text with `raw`."""
    if raw:
        return torch.tensor([text_ids(tokenizer, prompt)])
    return torch.tensor([prompt_ids(tokenizer, messages or [{"role": "user", "content": prompt}])])


def choose_domain(live: LiveModel, prompt: str, domain: str) -> tuple[str, float | None, str | None]:
    """(domain or 'base', router confidence, runner-up) for `domain` = a name, 'auto' or 'base'."""
    if domain == BASE:
        return BASE, None, None
    if domain != AUTO:
        live.store.adapter_name(domain)          # StoreError naming the store's domains if unknown
        return domain, None, None
    router = live.store.router()
    if router is None or not router.names:
        return BASE, None, None
    decision = route_texts(router, live.model, live.tokenizer, [prompt])[0]
    return decision.domain, decision.confidence, decision.runner_up


@torch.inference_mode()
def generate(live: LiveModel, prompt: str, *, domain: str = AUTO, backbone: str = "pinned",
             max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.9, seed: int | None = 0,
             raw: bool = False, stop: list[str] | None = None, on_text=None,
             messages: list[dict] | None = None) -> Generation:
    """Generate a continuation of `prompt` (or of chat `messages`). temperature 0 is greedy decoding
    (deterministic); otherwise nucleus sampling from torch's generator seeded with `seed`.
    `on_text(piece)` is called with each new piece of text as soon as it is decoded."""
    if max_new_tokens < 1:
        raise StoreError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise StoreError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    chosen, confidence, runner_up = choose_domain(live, prompt, domain)
    tok = live.tokenizer
    ids = encode_prompt(prompt, tok, raw, messages).to(next(live.model.parameters()).device)   # (1, s)
    sampling = temperature > 0
    if sampling and seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=tok.pad_token_id,
                  attention_mask=torch.ones_like(ids))
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tok)
    if on_text is not None:
        kwargs["streamer"] = _Callback(tok, on_text)
    store = live.store
    target = None if chosen == BASE else chosen
    started = time.perf_counter()
    with live.using(target, backbone) as model:
        out = model.generate(input_ids=ids, **kwargs)                                    # (1, s + new)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    if stop:
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        text = text[:cut] if cut >= 0 else text
    ended = len(new) < max_new_tokens or (len(new) and int(new[-1]) == tok.eos_token_id) or \
        bool(stop and any(s in tok.decode(new, skip_special_tokens=True) for s in stop))
    return Generation(text=text, domain=chosen, confidence=confidence, runner_up=runner_up,
                      adapter_version=None if target is None else store.adapter_meta(target)["version"],
                      backbone_version=store.backbone_version(target, backbone),
                      prompt_tokens=int(ids.shape[1]), new_tokens=int(len(new)), seconds=seconds,
                      finish_reason="stop" if ended else "length")
