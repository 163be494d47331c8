"""Task metrics: pure functions of answers and scores, no model.

Free-form answers (each against the best of several references):

    normalise(s)    = NFKC, lower case, punctuation -> space, articles (a, an, the) dropped, spaces collapsed
    exact_match     = max_r [normalise(answer) == normalise(r)]
    token_f1        = max_r 2 P R / (P + R),  P = |common tokens| / |answer tokens|,  R = |common| / |r tokens|
                      (SQuAD's definition; two empty answers match: 1.0; one empty: 0.0)
    rouge_l         = max_r ROUGE-L F-measure (Google's rouge-score, on the normalised tokens so that any
                      script is scored, not only ASCII)

Multiple choice: the choice with the highest log-likelihood sum log p(choice | question) (raw), and the
highest per byte of the choice (length-normalised, as lm-evaluation-harness's acc_norm); ties go to the
lowest index.

Continual-learning summaries of an accuracy matrix A (A[i][j]: score on task j after training phase i,
b[j]: the base model's score on task j), as GEM (Lopez-Paz & Ranzato, 2017) defines them:

    ACC = 1/T sum_j A[T-1][j]
    BWT = 1/(T-1) sum_{j<T-1} (A[T-1][j] - A[j][j])      (negative: forgetting)
    FWT = 1/(T-1) sum_{j>0} (A[j-1][j] - b[j])           (positive: earlier phases helped task j)
"""
from __future__ import annotations

import math
import sys
import unicodedata
from collections import Counter

ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    """Lower-cased NFKC text without punctuation or articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def tokens(text: str) -> list[str]:
    return normalise(text).split()


def exact_match(answer: str, references: list[str] | tuple[str, ...]) -> float:
    return float(any(normalise(answer) == normalise(r) for r in references))


def _f1(answer: list[str], reference: list[str]) -> float:
    if not answer or not reference:
        return float(answer == reference)
    common = sum((Counter(answer) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(answer), common / len(reference)
    return 2 * p * r / (p + r)


def token_f1(answer: str, references: list[str] | tuple[str, ...]) -> float:
    return max(_f1(tokens(answer), tokens(r)) for r in references)


class _Tokenizer:
    """rouge-score's tokenizer interface over crma's normalisation (its own keeps only [a-z0-9])."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


_ROUGE = []


def _rouge():
    """Google's rouge-score ROUGE-L scorer on crma's tokens, made on first use (importing rouge-score and its
    nltk takes about 1.2 s, which every crma process would otherwise pay)."""
    if not _ROUGE:
        from absl import logging as absl_logging  # heavy: with rouge-score, on first use only
        from rouge_score import rouge_scorer  # heavy: as above

        # absl's log handler keeps the sys.stderr of its import; where that is a stand-in (pytest's capture,
        # a notebook) it is closed later and flushing it at exit fails. The process's own stderr instead:
        absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)
        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer()))
    return _ROUGE[0]


def rouge_l(answer: str, references: list[str] | tuple[str, ...]) -> float:
    if not tokens(answer) and any(not tokens(r) for r in references):
        return 1.0
    return max(_rouge().score(r, answer)["rougeL"].fmeasure for r in references)


def free_form_scores(answer: str, references) -> dict[str, float]:
    return {"exact_match": exact_match(answer, references), "token_f1": token_f1(answer, references),
            "rouge_l": rouge_l(answer, references)}


def pick(scores: list[float]) -> int:
    """Index of the highest score; the lowest index among ties."""
    best = max(scores)
    return next(i for i, s in enumerate(scores) if s == best)


def choice_picks(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(raw pick, length-normalised pick): argmax of sum log p, and of sum log p / bytes of the choice."""
    per_byte = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    return pick(logliks), pick(per_byte)


# ---- summaries ---------------------------------------------------------------------------------------
Matrix = list[list[float | None]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(A: Matrix) -> float | None:
    """ACC over the tasks scored after the last phase (None cells: tasks without a set, skipped)."""
    return _mean([a for a in A[-1] if a is not None])


def backward_transfer(A: Matrix) -> float | None:
    T = len(A)
    return _mean([A[T - 1][j] - A[j][j] for j in range(T - 1) if A[T - 1][j] is not None and A[j][j] is not None])


def forward_transfer(A: Matrix, base: list[float | None]) -> float | None:
    T = len(A)
    return _mean([A[j - 1][j] - base[j] for j in range(1, T) if A[j - 1][j] is not None and base[j] is not None])


def seed_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean over seeds with a Student-t interval: mean +- t_{(1+c)/2, n-1} sd / sqrt(n). Each seed is one
    observation (items are not pooled across seeds); one seed gives no interval."""
    from scipy import stats  # heavy: only for summaries

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}

