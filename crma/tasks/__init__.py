"""Tasks: items that score what a model answers (free-form and multiple choice) and the metrics on them.

    items.py    task files -> TaskItems (any source and record format crma reads)
    metrics.py  exact match, token F1, ROUGE-L, multiple-choice picks; ACC, BWT, FWT; seed intervals
"""
from .items import CHOICE, FREE, TaskItem, read_tasks
from .metrics import (
    average_accuracy,
    backward_transfer,
    choice_picks,
    exact_match,
    forward_transfer,
    free_form_scores,
    normalise,
    rouge_l,
    seed_interval,
    token_f1,
)

__all__ = ["CHOICE", "FREE", "TaskItem", "average_accuracy", "backward_transfer", "choice_picks", "exact_match",
           "forward_transfer", "free_form_scores", "normalise", "read_tasks", "rouge_l", "seed_interval",
           "token_f1"]
