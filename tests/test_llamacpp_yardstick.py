"""The decoding benchmark's llama.cpp LoRA file (benchmarks/llamacpp.py): a PEFT adapter written as a
llama.cpp LoRA GGUF, read back from disk with gguf's own reader. llama.cpp itself (npm) is not needed:
the file's layout is checked against transformers' GGUF loader, which undoes llama.cpp's q/k row order
when it loads a Llama GGUF; the benchmark checks llama.cpp's greedy text with the file."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from crma.config import LoraSettings
from crma.method.adapters import add_adapter
from crma.method.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gguf = pytest.importorskip("gguf")
from llamacpp import GGUF_NAMES, lora_gguf  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402


def test_lora_file_holds_each_projections_a_and_b_in_llamacpp_layout(tmp_path):
    model, _ = load_model("tiny:llama")                       # 4 query heads, 2 kv heads
    model = add_adapter(model, "d0", LoraSettings())
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            layer.lora_B["d0"].weight.normal_(0, 0.05)
    path = lora_gguf(model, "d0", tmp_path / "lora.gguf")

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == LoraSettings().alpha
    stored = {t.name: np.asarray(t.data).reshape([int(x) for x in reversed(t.shape.tolist())])
              for t in reader.tensors}
    cfg = model.config
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                             "num_key_value_heads": cfg.num_key_value_heads})
    want = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        parts = name.split(".")
        block, proj = parts[parts.index("layers") + 1], parts[-1]
        base = f"blk.{block}.{GGUF_NAMES[proj]}.weight"
        want |= {f"{base}.lora_a", f"{base}.lora_b"}
        a, b = (module.lora_A["d0"].weight.detach().numpy(), module.lora_B["d0"].weight.detach().numpy())
        np.testing.assert_array_equal(stored[f"{base}.lora_a"], a)                      # (r, in)
        back = unpermute.process(stored[f"{base}.lora_b"], base).weights                # transformers' q/k order
        np.testing.assert_array_equal(back, b)                                          # (out, r)
        if proj in ("q_proj", "k_proj"):                      # reordered, not copied as is
            assert not np.array_equal(stored[f"{base}.lora_b"], b)
    assert set(stored) == want and len(want) == 2 * 7 * cfg.num_hidden_layers
