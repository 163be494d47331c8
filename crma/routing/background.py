"""The router's out-of-scope class ("outlier exposure") and its noise gate, both independent of any store's
domains.

Background: the conversational lines of chatterbot-corpus (PyPI `chatterbot-corpus`, BSD-3-Clause,
(c) Gunther Cox and contributors): every English category except those that are knowledge domains a store
may hold (coding, computers, tech_support, health, money, science, trivia), plus up to 40 lines of each of
its other languages (a seeded draw). Its text is never copied anywhere: it ships as the encoder's
embeddings of it (crma/routing/data/background-minilm.safetensors for the default encoder; computed
from the installed package for any other encoder) and routers store those embeddings.

Noise gate: random character strings split into about one character per token, real text into three to
five. `noise_gate` draws seeded random strings of printable ASCII and takes
    min_chars_per_token = 1.1 * quantile_0.99(cpt of the random strings)
unless that is not clearly below real text (quantile_0.01 of the background's English lines / 1.2; a
byte-level tokenizer gives 1.0 for everything), in which case the gate is off (0).

    python -m crma.routing.background     # rewrite the packaged MiniLM file (needs chatterbot-corpus)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import string
from pathlib import Path

import chatterbot_corpus
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .encoders import minilm
from .settings import RouterError

SOURCE = "chatterbot-corpus"
LICENSE = "BSD-3-Clause"
DROPPED = ("coding", "computers", "tech_support", "health", "money", "science", "trivia")
PER_OTHER_LANGUAGE = 40
DATA_DIR = Path(__file__).parent / "data"
PACKAGED = {"minilm": DATA_DIR / "background-minilm.safetensors"}


def _corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise RouterError(f"the router's background class needs the PyPI package {SOURCE}: "
                          f"pip install --no-deps {SOURCE}==1.3.3")
    return Path(spec.origin).parent / "data"


def _lines(path: Path) -> list[str]:

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return []
    out = []
    for conv in doc.get("conversations", []) or []:
        for line in conv if isinstance(conv, list) else [conv]:
            if isinstance(line, str) and line.strip():
                out.append(" ".join(line.split()))
    return out


def background_texts() -> tuple[list[str], list[bool], dict]:
    """(lines, is_english per line, provenance) of the background set, deduplicated, in a fixed order."""
    root = _corpus_dir()
    try:
        version = getattr(chatterbot_corpus, "__version__", "?")
    except ImportError:          # pragma: no cover - found by find_spec above
        version = "?"
    english, categories = [], []
    for path in sorted((root / "english").glob("*.yml")):
        if path.stem in DROPPED:
            continue
        categories.append(path.stem)
        english += _lines(path)
    english = list(dict.fromkeys(english))
    seen = set(english)
    other, languages = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "english"):
        lines = [t for path in sorted(folder.glob("*.yml")) for t in _lines(path) if t not in seen]
        lines = list(dict.fromkeys(lines))
        if not lines:
            continue
        random.Random(f"crma-background-{folder.name}").shuffle(lines)
        picked = lines[:PER_OTHER_LANGUAGE]
        seen.update(picked)
        other += picked
        languages.append(folder.name)
    texts = english + other
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    info = {"source": f"{SOURCE}=={version}", "license": LICENSE, "english_categories": categories,
            "dropped_categories": list(DROPPED), "other_languages": languages,
            "per_other_language": PER_OTHER_LANGUAGE, "n_english": len(english), "n_other": len(other),
            "n": len(texts), "text_sha256": digest}
    return texts, [True] * len(english) + [False] * len(other), info


def noise_strings(n: int = 400, seed: int = 1234) -> list[str]:
    """Seeded random strings of printable ASCII (letters, digits, punctuation, some spaces), 8-120 characters."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(8, 120))).strip() or "x" for _ in range(n)]


def noise_gate(noise_cpt: torch.Tensor, text_cpt: torch.Tensor) -> tuple[float, dict]:
    """min characters per token from the cpt of random strings and of real (background English) text."""
    noise_hi = float(torch.quantile(noise_cpt.double(), 0.99))
    text_lo = float(torch.quantile(text_cpt.double(), 0.01))
    gate = 1.1 * noise_hi
    if gate >= text_lo / 1.2:
        gate = 0.0
    return gate, {"noise_q99": noise_hi, "text_q01": text_lo, "rule": "1.1 * q99(random strings), "
                  "off unless below q01(background English) / 1.2"}


def compute_background(encode) -> tuple[torch.Tensor, float, dict]:
    """(embeddings (N, width) float16, noise gate, provenance) with `encode(texts) -> Features` (full
    features; the caller keeps the leading columns the router's background test reads)."""
    texts, english, info = background_texts()
    f = encode(texts)
    noise = encode(noise_strings())
    is_en = torch.tensor(english)
    words = torch.tensor([len(t.split()) >= 3 for t in texts])
    gate, how = noise_gate(noise.chars_per_token, f.chars_per_token[is_en & words])
    return f.pooled.half(), gate, {**info, "noise": how}


def load_packaged(name: str, spec: dict) -> tuple[torch.Tensor, float, dict] | None:
    """The packaged background of encoder `name` if it was made with exactly these encoder settings."""
    path = PACKAGED.get(name)
    if path is None or not path.exists():
        return None

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        info = json.loads(meta.get("info", "{}"))
        if info.get("encoder") != _comparable(spec):
            return None
        emb = f.get_tensor("embeddings")
    return emb, float(info["noise_min_chars_per_token"]), info["background"]


def _comparable(spec: dict) -> dict:
    """Encoder settings that change the background embeddings (not the mix layer: it is not stored)."""
    return {k: v for k, v in spec.items() if k not in ("mix_layer", "dim")}


def background_for(cfg, spec: dict, encode) -> tuple[torch.Tensor, float, dict]:
    """(embeddings (N, abstain_dims), noise gate, provenance) for a new router: the packaged file when it
    matches the encoder settings, else computed now with `encode`."""
    found = load_packaged(cfg.encoder, spec)
    if found is not None:
        emb, gate, info = found
        return emb, gate, {**info, "embeddings": "packaged"}
    emb, gate, info = compute_background(encode)
    return emb[:, : spec["abstain_dims"]], gate, {**info, "embeddings": "computed"}


def write_packaged(path: Path | None = None, max_tokens: int = 64) -> Path:
    """Encode the background with MiniLM and write it (float16 embeddings + provenance, no text)."""


    enc = minilm()
    spec = enc.spec(max_tokens)
    emb, gate, info = compute_background(lambda texts: enc.encode(texts, max_tokens))
    path = path or PACKAGED["minilm"]
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"encoder": _comparable(spec), "noise_min_chars_per_token": gate, "background": info}
    save_file({"embeddings": emb[:, : spec["abstain_dims"]].contiguous()}, str(path),
              metadata={"info": json.dumps(meta)})
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = write_packaged()
    print(f"wrote {out}")
