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
    """One request's sampling settings and its own torch.Generator (seeded: reproducible whatever else
    is in the batch); greedy when the temperature is below GREEDY_BELOW (no generator, no draw)."""

    def __init__(self, params: SamplingParams):
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = None
        if params.temperature >= GREEDY_BELOW:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def draw(self, probs: torch.Tensor, ids: torch.Tensor, whole: bool) -> int:
        """One token from candidates `ids` (m,) with probabilities `probs` (m,) float64, sorted by descending
        probability unless `whole` (the whole vocabulary, any order, no nucleus cut). Inverse CDF with one
        uniform u from the request's generator over the nucleus (top-p: the smallest prefix whose mass
        reaches top_p; the most likely token always):

            c_i = sum_{j<=i} p_j,   keep_i = [c_{i-1} < top_p] (keep_0 = 1),
            token = ids[min{i : sum_{j<=i} keep_j p_j > u sum_j keep_j p_j}]"""
        cdf = torch.cumsum(probs, 0)                                                   # (m,)
        if not whole:
            keep = torch.ones_like(probs, dtype=torch.bool)
            keep[1:] = cdf[:-1] < self.top_p
            cdf = torch.cumsum(torch.where(keep, probs, torch.zeros_like(probs)), 0)
        u = torch.rand((), dtype=torch.float64, generator=self.generator)
        i = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        return int(ids[min(i, len(ids) - 1)])


PREFILTER = (64, 1024)     # candidates tried before the full sort: the nucleus usually lies in the first few


def next_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> list[int | Exception]:
    """Each row's next token (or the exception that row's choice raised: that request alone fails).

    logits (b, vocab) of the last position. Greedy rows: one argmax over all of them. Sampled rows, in
    float64 on max-subtracted scores (no temperature the validation lets through can overflow):

        p_v = exp(z_v - logsumexp(z)),   z_v = (logits_v - max logits) / T

    then a top-k prefilter instead of a full sort: when the k most likely tokens (k in PREFILTER, batched
    over rows) have mass c_{k-1} >= top_p, no token ranked lower is kept (c never decreases), and the
    draw over them equals the draw over the fully sorted vocabulary (the same prefix of the same ranking,
    the same cumulative sums, the same u); rows whose nucleus is wider try the next k, then the full sort.
    top_p = 1 draws over the vocabulary unsorted."""
    out: list[int | Exception] = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy:
        for i, token in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            out[i] = token
    rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if not rows:
        return out
    scores = logits[rows].detach().to("cpu", torch.float64)                           # (n, vocab)
    top = scores.max(-1, keepdim=True).values                                         # (n, 1)
    temps = torch.tensor([[samplers[i].temperature] for i in rows], dtype=torch.float64)
    z = (scores - top) / temps                                                         # (n, vocab), <= 0
    lse = torch.logsumexp(z, -1, keepdim=True)                                         # (n, 1)
    bad = ~(torch.isfinite(top[:, 0]) & torch.isfinite(lse[:, 0]))
    todo = []
    for j, i in enumerate(rows):
        if bad[j]:
            out[i] = SamplingError(f"the model's scores for this request are not finite (max {top[j, 0].item()})")
        elif samplers[i].top_p >= 1.0:
            out[i] = _draw(samplers[i], torch.exp(z[j] - lse[j]), torch.arange(z.shape[1]), True)
        else:
            todo.append(j)
    vocab = z.shape[1]
    for k in (*(k for k in PREFILTER if k < vocab), vocab):
        if not todo:
            break
        vals, ids = torch.topk(z[todo], k, dim=-1)                                     # (m, k), descending
        probs = torch.exp(vals - lse[todo])                                            # (m, k)
        mass = torch.cumsum(probs, -1)[:, -1].tolist()                                 # (m,) c_{k-1}
        left = []
        for r, j in enumerate(todo):
            sampler = samplers[rows[j]]
            if k < vocab and not mass[r] >= sampler.top_p:
                left.append(j)                                                         # nucleus wider than k
                continue
            out[rows[j]] = _draw(sampler, probs[r], ids[r], False)
        todo = left
    return out


def _draw(sampler: Sampler, probs: torch.Tensor, ids: torch.Tensor, whole: bool) -> int | Exception:
    try:
        return sampler.draw(probs, ids, whole)
    except Exception as err:                           # noqa: BLE001 - this row's failure, handed back
        return err


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
