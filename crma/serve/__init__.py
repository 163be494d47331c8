"""`crma serve`: an OpenAI-compatible HTTP server for a model store, used while it learns.

    protocol.py   the OpenAI wire format: request models, error objects, response/chunk bodies
    app.py        the FastAPI routes (completions, chat, models, health, metrics, admin reload), SSE streaming
    config.py     ServeConfig: address, batch and queue sizes, request limits, reload options
    server.py     the process's state: model, registry, scheduler, limits; reload
    registry.py   snapshots of the store's manifest; hot reload; what stays loaded for requests in flight
    scheduler.py  continuous batching in one model-owning thread: admit, prefill, step, retire
    mixed.py      one forward over rows with different LoRA adapters (PEFT adapter_names) and backbone versions
    lora_rows.py  `--lora-mixing gather` (default): per-row LoRA from stacked adapter weights
    step.py       the decoding step of Llama-family models in plain torch calls (no transformers modules)
    linear.py     float32 CPU linear layers as oneDNN GEMMs on weights packed once
    prefill.py    batched prefill with reused prompt prefixes
    batch.py      the running batch's left-padded KV cache
    decoding.py   sampling (greedy / seeded top-p) and stop-string-safe incremental detokenising
    watch.py      --watch: reload when the manifest changes
    auth.py       API keys: who may call /v1, and which domains each key may use
    telemetry.py  Prometheus metrics (/metrics) and the routing log (one JSON line per request)
    route_log.py  `crma route-log`: the routing log summarised for an operator
"""
from .config import ServeConfig

__all__ = ["ServeConfig"]
