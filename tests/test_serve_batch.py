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
                batch.add(cache, torch.ones(1, prompts[k].shape[1], dtype=torch.long), [0])
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


def test_batched_prefill_with_reused_prefixes_equals_each_prompt_alone():
    """Prompts of different lengths read in one forward, some continuing a stored prefix (the padding then
    sits between the prefix and the row's own tokens): each row's next-token logits and its decoding in
    the batch equal the prompt read and decoded alone; the prefix store finds the longest stored block
    prefix of the same route key only, and evicts beyond its budget."""
    from crma.serve.prefill import BLOCK, PrefixCache, prefill

    model, _ = load_model("tiny:llama")
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(1, 200, (20,), generator=gen).tolist()                # a shared "system prompt"
    prompts = [system + torch.randint(1, 200, (n,), generator=gen).tolist() for n in (3, 9, 1)]
    prompts.append(torch.randint(1, 200, (6,), generator=gen).tolist())        # shares nothing

    def forward(ids, routes, cache, attention_mask=None, position_ids=None):
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]

    def alone(ids: list[int], steps: int) -> list[torch.Tensor]:
        cache = new_cache(model.config)
        out = [forward(torch.tensor([ids]), None, cache)[0]]
        for _ in range(steps):
            out.append(forward(torch.tensor([[7]]), None, cache)[0])
        return out

    with torch.inference_mode():
        store = PrefixCache(1 << 20)
        logits, cache, mask = prefill(forward, model.config, None, prompts[:1], [store.lookup("a", prompts[0])],
                                      "cpu")
        assert store.wants("a", prompts[0])
        store.store("a", prompts[0], [x.keys[0] for x in cache.layers], [x.values[0] for x in cache.layers])
        assert not store.wants("a", prompts[0])
        pasts = [store.lookup("a", p) for p in prompts]
        assert [p.length for p in pasts] == [16, 16, 16, 0] and store.lookup("b", prompts[1]).length == 0
        logits, cache, mask = prefill(forward, model.config, None, prompts, pasts, "cpu")    # (4, vocab)
        assert mask.shape == (4, 16 + 13) and mask.sum(1).tolist() == [len(p) for p in prompts]
        batch = BatchCache()
        batch.add(cache, mask, [0, 1, 2, 3])
        steps = [logits]
        for _ in range(3):
            m, positions = batch.step_inputs()
            steps.append(model(input_ids=torch.full((4, 1), 7), attention_mask=m, position_ids=positions,
                               cache=batch.cache, use_cache=True).logits[:, -1])
            batch.stepped()
        for r, prompt in enumerate(prompts):
            want = alone(prompt, 3)
            assert max((s[r] - w).abs().max().item() for s, w in zip(steps, want, strict=True)) <= 1e-5, r
    small = PrefixCache(2 * 16 * 2 * model.config.num_hidden_layers * 2 * 16 * 4)    # room for ~2 entries
    for k in range(4):
        ids = [k] * (2 * BLOCK + 1)
        small.store("a", ids, [torch.zeros(2, len(ids), 16)] * 2, [torch.zeros(2, len(ids), 16)] * 2)
    assert small.nbytes <= small.budget and small.lookup("a", [0] * (2 * BLOCK + 1)).length == 0
    assert small.lookup("a", [3] * (2 * BLOCK + 1)).length == 2 * BLOCK


def test_prefill_buckets_group_similar_lengths_within_a_token_budget():
    from crma.serve.prefill import BUCKET_TOKENS, buckets

    groups = buckets([40] * 16)
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert all(40 * len(g) <= BUCKET_TOKENS for g in groups) and len(groups) == -(-16 // (BUCKET_TOKENS // 40))
    assert buckets([5, 200, 7, 30, 6]) == [[0, 4, 2], [3], [1]]          # short ones together, long ones apart
