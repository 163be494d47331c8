"""The preallocated batch KV cache (crma/serve/batch.py) against transformers' DynamicCache, row by row."""
from __future__ import annotations

import torch

from crma.method.models import load_model
from crma.serve.batch import BatchCache, new_cache


def test_batch_cache_rows_joining_and_leaving_equal_each_row_alone():
    """Rows join a running batch (shorter prompts left-padded, a longer one shifting the batch), leave in
    the middle, and the buffers grow past their first capacity: every row's logits at every step equal
    the row decoded alone with transformers' DynamicCache, and no step concatenates the cache."""
    model, _ = load_model("tiny:llama")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 200, (1, n), generator=gen) for n in (5, 3, 9, 2, 70)]
    joins = {0: [0, 1], 2: [2], 4: [3], 6: [4]}                  # step -> prompts that join before it
    leaves = {3: 1, 7: 0}                                        # step -> prompt that leaves after it
    steps, feed = 12, 7

    def alone(k: int, n: int) -> list[torch.Tensor]:
        cache = new_cache(model.config)
        model(input_ids=prompts[k], cache=cache, use_cache=True)
        out = []
        for _ in range(n):
            out.append(model(input_ids=torch.tensor([[feed]]), cache=cache, use_cache=True).logits[0, -1])
        return out

    batch, rows, got = BatchCache(), [], {}
    with torch.inference_mode():
        for step in range(steps):
            for k in joins.get(step, []):
                cache = new_cache(model.config)
                model(input_ids=prompts[k], cache=cache, use_cache=True)
                batch.add(cache, prompts[k].shape[1])
                rows.append(k)
            mask, positions = batch.step_inputs()
            buffer = batch.cache.layers[0].keys
            logits = model(input_ids=torch.full((len(rows), 1), feed), attention_mask=mask, position_ids=positions,
                           cache=batch.cache, use_cache=True).logits[:, -1]                 # (rows, vocab)
            batch.stepped()
            assert batch.cache.layers[0].keys is buffer                                     # written in place
            for r, k in enumerate(rows):
                got.setdefault(k, []).append(logits[r])
            if step in leaves:
                keep = [r for r, k in enumerate(rows) if k != leaves[step]]
                batch.keep(keep)
                rows = [rows[r] for r in keep]
        for k, seq in got.items():
            want = alone(k, len(seq))
            assert max((a - b).abs().max().item() for a, b in zip(seq, want, strict=True)) <= 1e-5, k
        assert batch.length > 64 and len(batch) == 3                # grew past the first 64 columns
