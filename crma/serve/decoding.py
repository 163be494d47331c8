"""Per-request decoding: choosing the next token (greedy or seeded nucleus sampling) and turning
token ids into text pieces safe to send (no half UTF-8 characters, nothing that may become a stop
string), the way OpenAI streams do.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5      # a temperature below this samples greedily (vLLM's convention: _SAMPLING_EPS)


class SamplingError(ValueError):
    """One row's next token cannot be chosen (its scores are not finite): that request alone fails."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 (or below GREEDY_BELOW): greedy (argmax), deterministic
    top_p: float = 1.0
    seed: int | None = None           # None: a fresh random seed
    stop: tuple[str, ...] = ()
    logprobs: int | None = None       # report each generated token's log-probability and this many alternatives
    echo: bool = False                # report the prompt tokens' log-probabilities too (completions' echo)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")


def logprob_entry(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, log p(token), the `top` most likely tokens with their log p) under the model's distribution
    (the raw scores, before temperature or top-p, as OpenAI and vLLM report them).

        log p(t) = logits[t] - logsumexp(logits)"""
    lp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)            # (vocab,)
    alts = torch.topk(lp, top) if top else None
    return token, float(lp[token]), ([(int(i), float(v)) for v, i in zip(alts.values, alts.indices)] if top else [])


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[tuple]:
    """Entries for every prompt token from the prefill's logits (s, vocab): the first has no log-probability."""
    out = [(ids[0], None, [])]
    lp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)            # (s, vocab)
    for t in range(1, len(ids)):
        alts = torch.topk(lp[t - 1], top) if top else None
        out.append((ids[t], float(lp[t - 1, ids[t]]),
                    [(int(i), float(v)) for v, i in zip(alts.values, alts.indices)] if top else []))
    return out


class Sampler:
    """Next-token choice for one request, with its own torch.Generator (seeded: reproducible whatever
    else is in the batch). The softmax runs in float64 on max-subtracted scores, so no temperature the
    request validation lets through can overflow it."""

    def __init__(self, params: SamplingParams):
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = None
        if params.temperature >= GREEDY_BELOW:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (vocab,) of the last position -> token id."""
        if self.generator is None:
            return int(torch.argmax(logits))
        scores = logits.detach().to("cpu", torch.float64)
        top = scores.max()
        if not torch.isfinite(top):
            raise SamplingError(f"the model's scores for this request are not finite (max {top.item()})")
        probs = torch.softmax((scores - top) / self.temperature, dim=-1)               # (vocab,), every exponent <= 0
        if not torch.isfinite(probs).all():
            raise SamplingError("the model's scores for this request are not finite")
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_p, 0) - sorted_p                              # mass ranked above each
            sorted_p = torch.where(before < self.top_p, sorted_p, torch.zeros_like(sorted_p))
            sorted_p[0] = sorted_p[0] if sorted_p[0] > 0 else 1.0                       # always keep the best
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Decodes a request's generated ids and releases text as soon as it is final.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in a
    prefix of a stop string; a stop string ends the generation and is not part of the text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0                   # characters of the text already released
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the newly releasable text (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)], final=True)
        return self._release(text, final=False)

    def finish(self) -> str:
        """The generation ended (length or end of text): release whatever is held back."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True) if not self.stopped else self.text
        return self._release(text, final=True)

    def _release(self, text: str, final: bool) -> str:
        self.text = text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:               # keep back a tail that could still grow into a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        piece, self.sent = text[self.sent:end], end
        return piece
