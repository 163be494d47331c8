"""Next-token choice on its own: greedy rows, the top-k prefilter against the full sort, seeded rows
independent of their neighbours, the nucleus distribution, a row whose scores are not finite."""
from __future__ import annotations

import torch

from crma.serve.decoding import PREFILTER, Sampler, SamplingParams, next_tokens


def full_sort_draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The nucleus over the fully sorted vocabulary (the definition the prefilter must reproduce)."""
    z = (logits.double() - logits.double().max()) / temperature
    probs, order = torch.sort(torch.exp(z - torch.logsumexp(z, 0)), descending=True)
    cdf = torch.cumsum(probs, 0)
    keep = torch.cat([torch.ones(1, dtype=torch.bool), cdf[:-1] < top_p])
    cdf = torch.cumsum(torch.where(keep, probs, torch.zeros_like(probs)), 0)
    u = torch.rand((), dtype=torch.float64, generator=generator)
    return int(order[min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), len(order) - 1)])


def test_prefilter_draws_equal_the_full_sort_token_for_token():
    """Peaked rows (nucleus inside 64), flatter rows (inside 1024) and flat rows (the full sort): every
    draw equals the full-sort nucleus's draw with the same seed, over 40 steps of a 6-row batch."""
    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    settings = [(0.7, 0.9, 6.0), (1.0, 0.95, 4.0), (1.3, 0.9, 1.0), (0.05, 0.5, 1.0), (1.0, 0.99, 0.05),
                (2.0, 0.999, 0.3)]                                   # (temperature, top_p, logit scale)
    samplers = [Sampler(SamplingParams(temperature=t, top_p=p, seed=10 + k)) for k, (t, p, _) in enumerate(settings)]
    refs = [torch.Generator().manual_seed(10 + k) for k in range(len(settings))]
    widths = set()
    for _ in range(40):
        logits = torch.stack([torch.randn(vocab, generator=gen) * scale for _, _, scale in settings])   # (6, vocab)
        got = next_tokens(logits, samplers)
        for k, (t, p, _) in enumerate(settings):
            assert got[k] == full_sort_draw(logits[k], t, p, refs[k]), (k, t, p)
            z = (logits[k].double() - logits[k].double().max()) / t
            mass = torch.cumsum(torch.sort(torch.softmax(z, 0), descending=True)[0], 0)
            widths.add(next((w for w in PREFILTER if mass[w - 1] >= p), vocab))
    assert widths == {*PREFILTER, vocab}                             # every tier was used


def test_greedy_rows_skip_sampling_and_seeded_rows_ignore_their_neighbours():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=gen) * 3                   # (8, vocab)

    def samplers():
        return [Sampler(SamplingParams(temperature=0.0 if k % 2 else 0.8, top_p=0.9 if k % 4 else 1.0, seed=k))
                for k in range(8)]
    batch = samplers()
    together = next_tokens(logits, batch)
    assert [together[k] for k in (1, 3, 5, 7)] == logits[[1, 3, 5, 7]].argmax(-1).tolist()
    assert all(batch[k].generator is None for k in (1, 3, 5, 7))
    alone = [next_tokens(logits[k:k + 1], [s])[0] for k, s in enumerate(samplers())]
    assert together == alone                                         # whatever else is in the batch
    assert next_tokens(logits[:2], samplers()[:2]) == alone[:2]


def test_draws_follow_the_nucleus_distribution():
    """2,000 seeded rows of one small distribution: frequencies match the nucleus's renormalised mass."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits.double(), 0)                        # kept: 0.48, 0.29, 0.18 -> mass 0.95 >= 0.9
    kept = probs[:3] / probs[:3].sum()
    n = 2000
    got = next_tokens(logits.expand(n, -1), [Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=s))
                                             for s in range(n)])
    counts = torch.bincount(torch.tensor(got), minlength=6).double() / n
    assert counts[3:].sum() == 0
    assert (counts[:3] - kept).abs().max() < 0.04                    # ~4 standard deviations


def test_a_row_with_scores_that_are_not_finite_fails_alone():
    logits = torch.randn(3, 50)
    logits[1, 4] = float("nan")
    got = next_tokens(logits, [Sampler(SamplingParams(temperature=0.7, seed=s)) for s in range(3)])
    assert isinstance(got[1], ValueError) and isinstance(got[0], int) and isinstance(got[2], int)

