"""crma/serve/gemv.py: one-row linear layers through a kernel compiled by inductor, and linear.py's use of it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crma.serve.gemv import RowGemv
from crma.serve.linear import PackedLinears

ROOT = Path(__file__).resolve().parents[1]


def _layers(dtype: torch.dtype) -> list[nn.Linear]:
    """Three layers of one 48-wide input: 40, 8 (with a bias) and 24 outputs."""
    torch.manual_seed(0)
    return [layer.to(dtype) for layer in (nn.Linear(48, 40, bias=False), nn.Linear(48, 8),
                                           nn.Linear(48, 24, bias=False))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_gives_the_layers_outputs_side_by_side(dtype):
    """One kernel for three layers of one input (sizes unlike the ones it was compiled with, one bias):
    [x W_1^T | x W_2^T + b_2 | x W_3^T], in float32 rounded once to the dtype; one layer alone as well."""
    layers = _layers(dtype)
    kernel = RowGemv(tuple(m.weight for m in layers), tuple(m.bias for m in layers))
    assert kernel.ok and all(p.data_ptr() == m.weight.data_ptr() for p, m in zip(kernel.params, layers))  # no copy
    x = torch.randn(1, 48).to(dtype)
    with torch.inference_mode():
        got = kernel(x)
        want = torch.cat([F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
                          for m in layers], -1).to(dtype)
        alone = RowGemv((layers[1].weight,), (layers[1].bias,))(x)
    assert got.shape == (1, 72) and got.dtype == dtype
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.01}
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(alone, want[:, 40:48], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_folds_a_lora_update_in(dtype):
    """RowGemv.fitting: the layers' outputs plus D (x A^T) for A (R, in) and D (sum out, R) float32 (PEFT
    keeps adapters float32 beside a bfloat16 model): the base outputs rounded, the float32 update added,
    rounded again, as PEFT adds an update. `fitting` refuses an update of the wrong shape or rank 1."""
    layers = _layers(dtype)
    kernel = RowGemv(tuple(m.weight for m in layers), tuple(m.bias for m in layers))
    gen = torch.Generator().manual_seed(1)
    a, d = torch.randn(6, 48, generator=gen), torch.randn(72, 6, generator=gen)
    fitting = kernel.fitting(None, (a, d), None)
    assert fitting is not None
    assert kernel.fitting(None, (a[:, :40].contiguous(), d), None) is None
    assert kernel.fitting(None, (a, d[:60].contiguous()), None) is None
    assert kernel.fitting(None, (a[:1].contiguous(), d[:, :1].contiguous()), None) is None         # rank 1
    x = torch.randn(1, 48).to(dtype)
    with torch.inference_mode():
        got = fitting(x, *kernel.params, a, d)
        base = torch.cat([F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
                          for m in layers], -1).to(dtype)
        want = (base.float() + x.float() @ a.T @ d.T).to(dtype)
    assert got.shape == (1, 72) and got.dtype == dtype
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.01}
    torch.testing.assert_close(got, want, **tolerance)
    assert (got.float() - base.float()).abs().max() > 1                                      # the update shows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_normalises_its_input_first(dtype):
    """With an RMSNorm folded in, the kernel reads h and computes the layers of rmsnorm(h) g (a weight
    unlike ones), with and without a LoRA update: step.rms_norm then the layers, as the step did."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from crma.serve.step import rms_norm

    layers = _layers(dtype)
    kernel = RowGemv(tuple(m.weight for m in layers), tuple(m.bias for m in layers))
    gen = torch.Generator().manual_seed(4)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.rand(48, generator=gen))
    a, d = torch.randn(6, 48, generator=gen), torch.randn(72, 6, generator=gen)
    h = (3 * torch.randn(1, 48, generator=gen)).to(dtype)
    assert kernel.fitting((norm.weight[:40], 1e-5), None, None) is None                     # g of another size
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.01}
    with torch.inference_mode():
        x = rms_norm(h, norm)
        for update in (None, (a, d)):
            fitting = kernel.fitting((norm.weight, norm.variance_epsilon), update, None)
            got = fitting(h, *kernel.params, norm.weight, *(update or ()))
            want = torch.cat([F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
                              for m in layers], -1).to(dtype)
            if update is not None:
                want = (want.float() + x.float() @ a.T @ d.T).to(dtype)
            if dtype == torch.bfloat16:           # x itself may differ by an ulp (another order of the mean)
                tolerance = {"atol": 0.02 * want.abs().max().item(), "rtol": 0}
            torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_ends_a_block_with_crma(dtype):
    """A block's last projection with the residual and the row's CRMA operators in its kernel: z = h + y
    (y with or without a LoRA update), then z + delta_rows(z) as the decoding step computes it."""
    from crma.method.layer import delta_rows

    layer = _layers(dtype)[0]                                                               # 48 -> 40
    kernel = RowGemv((layer.weight,), (layer.bias,))
    gen = torch.Generator().manual_seed(2)
    read_mix, write = torch.randn(1, 40, 4, generator=gen) / 40 ** 0.5, 0.1 * torch.randn(1, 4, 40, generator=gen)
    p, q = read_mix[0].T.contiguous(), write[0].T.contiguous()                              # (n, d), (d, n)
    a, d = torch.randn(6, 48, generator=gen), torch.randn(40, 6, generator=gen)
    x, h = torch.randn(1, 48).to(dtype), torch.randn(1, 40).to(dtype)
    assert kernel.fitting(None, None, (h, p, q[:30].contiguous())) is None                         # Q of another size
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    with torch.inference_mode():
        for update in (None, (a, d)):
            fitting = kernel.fitting(None, update, (h, p, q))
            got = fitting(x, *kernel.params, *(update or ()), h, p, q)
            y = F.linear(x.float(), layer.weight.float()).to(dtype)
            if update is not None:
                y = (y.float() + x.float() @ a.T @ d.T).to(dtype)
            z = h + y
            want = z + delta_rows(z, read_mix, write)
            torch.testing.assert_close(got, want, **tolerance)
            assert (got.float() - z.float()).abs().max() > 0.1                              # CRMA shows


def test_packed_layers_take_the_kernel_for_one_row_only():
    """PackedLinears (row_gemv, the default) computes one row with the kernel over the layer's own weights
    and several rows with oneDNN, a group's layers side by side either way; float16 weights (FBGEMM) and
    row_gemv=False never take it."""
    layers = _layers(torch.float32)
    model = nn.Sequential(*layers, nn.Linear(48, 16))
    linears = PackedLinears()
    linears.install(model, lambda m: [tuple(layers)])
    group, alone = linears.group(tuple(layers)), model[3].forward.args[1]
    assert group.packed.row is not None and alone.row is not None
    with torch.inference_mode():
        for rows in (1, 3):
            x = torch.randn(rows, 48)
            want = torch.cat([F.linear(x, m.weight, m.bias) for m in layers], -1)
            torch.testing.assert_close(torch.cat(group(x), -1), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model[3](x), F.linear(x, model[3].weight, model[3].bias), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 48)
        assert torch.equal(group.packed(x), group.packed.row(x))                # one row: the kernel's result
    linears.remove()
    for off in (PackedLinears(row_gemv=False), PackedLinears(half=True)):
        off.install(model, lambda m: [tuple(layers)])
        assert all(g.packed.row is None for g in off.groups.values())
        off.remove()


def test_without_a_compiler_one_row_stays_with_onednn(tmp_path):
    """Where inductor cannot compile (no C++ compiler), the layers warn once and keep oneDNN for one row,
    with the same outputs."""
    script = textwrap.dedent("""
        import logging, torch, torch.nn.functional as F
        from torch import nn
        from crma.serve import gemv
        from crma.serve.linear import PackedLinears
        logging.basicConfig(level=logging.WARNING)
        layer = nn.Linear(48, 40)
        linears = PackedLinears()
        linears.install(nn.Sequential(layer))
        assert layer.forward.args[1].row is None and gemv.compile_error()
        with torch.inference_mode():
            x = torch.randn(1, 48)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        print("fallback ok")
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout
    assert done.stderr.count("one-row linear kernels could not be compiled") == 1
