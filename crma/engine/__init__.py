"""Work on a live model: a store's model in memory (live.py), training a phase (train.py), adding a domain
(add.py), a continual run (run.py), losses (loss.py), evaluating a store (evaluation.py), generating text
(generate.py), the router's evaluation (route_eval.py) and the continual-learning metrics (metrics.py)."""
