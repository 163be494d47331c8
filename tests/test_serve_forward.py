"""The batched forward of `crma serve` on tiny real models: rows with their own CRMA backbone version and
LoRA adapter (stacked LoRA against PEFT's adapter_names), the packed linear layers, and crma's own
decoding step against transformers' forward."""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import pytest
import torch

from crma.engine.live import LiveModel
from crma.store import Store
from tests.test_serve import DOMAINS, add, write_cycles


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A modular tiny:llama store with three domains (three backbone versions)."""
    data = write_cycles(tmp_path_factory.mktemp("forward_data"), 100)
    root = tmp_path_factory.mktemp("forward_store") / "s"
    for name in DOMAINS:
        add(root, data, name)
    return root


# ---- the CRMA per-row gather -----------------------------------------------------------------------
def test_per_row_backbone_versions_match_each_row_alone():
    from crma.config import CRMAConfig
    from crma.method.backbone import CRMABackbone
    from crma.method.models import load_model

    model, _ = load_model("tiny:llama")
    backbone = CRMABackbone.for_model(model, CRMAConfig()).attach(model)
    gen = torch.Generator().manual_seed(0)
    states = {}
    with torch.no_grad():
        for v in (1, 2, 3):
            for block in backbone.crma_blocks:
                block.crma_theta.add_(torch.randn(block.crma_theta.shape, generator=gen))
                block.crma_gate.fill_(0.5 * v)
                block.crma_read.add_(0.3 * torch.randn(block.crma_read.shape, generator=gen))
                block.crma_write.add_(0.3 * torch.randn(block.crma_write.shape, generator=gen))
            states[v] = {k: t.clone() for k, t in backbone.state_dict().items()}
        stack = backbone.stack_versions(states)
        ids = torch.randint(0, 256, (5, 11), generator=gen)
        versions = [2, 1, 3, 3, 1]
        with backbone.per_row(stack, stack.rows(versions)):
            mixed = model(input_ids=ids).logits
        assert all(b.row_operators is None for b in backbone.crma_blocks)
        with backbone.bypassed():
            base = model(input_ids=ids).logits
        for row, v in enumerate(versions):
            backbone.load_state_dict(states[v])
            alone = model(input_ids=ids[row:row + 1]).logits[0]      # the single-version path, row alone
            assert (mixed[row] - alone).abs().max().item() <= 1e-5   # fp32 rounding only (batched GEMMs)
            assert (alone - base[row]).abs().max().item() > 1e-3     # versions really differ from the base
            other = states[1 if v != 1 else 2]
            backbone.load_state_dict(other)
            assert (mixed[row] - model(input_ids=ids[row:row + 1]).logits[0]).abs().max().item() > 1e-4


def test_stacked_lora_gather_matches_peft_adapter_names(store):
    """The default --lora-mixing gather computes what PEFT's adapter_names computes, row by row, also after
    an adapter was loaded and another dropped (the stacks change incrementally: the others keep their slots)."""
    from crma.serve.batch import BatchCache, new_cache
    from crma.serve.mixed import MixedForward
    from crma.serve.registry import Registry

    live = LiveModel.open(Store(store))
    registry = Registry(live, store)
    registry.install(registry.prepare(force=True))

    def run(routes, mixing):
        forward, batch, steps = MixedForward(live, registry, mixing), BatchCache(), []
        for k, route in enumerate(routes):
            ids = torch.tensor([list(b"abcdxyzw"[: 3 + k])])
            cache = new_cache(live.model.config)
            forward(ids, [route], cache)
            batch.add(cache, torch.ones_like(ids), [0])
        for _ in range(4):
            mask, positions = batch.step_inputs()
            steps.append(forward(torch.full((len(routes), 1), 97), routes, batch.cache, mask, positions))
            batch.stepped()
        forward.close()
        return forward.stacked, torch.stack(steps)                           # (steps, rows, vocab)

    def check(routes):
        _, peft = run(routes, "peft")
        stacked, gather = run(routes, "gather")
        assert (peft - gather).abs().max().item() <= 1e-5
        assert torch.equal(peft.argmax(-1), gather.argmax(-1))

    with torch.inference_mode():
        routes = [registry.current.routes[m] for m in ("up", "base", "down", "zig", "up", "zig")]
        check(routes)
        check([routes[2]] * 3)                                                  # one adapter: shared weights
        forward = MixedForward(live, registry)
        assert forward.lora_mixing == "gather"
        forward.stacked.sync(live.model, live.adapters)
        slots = dict(forward.stacked.slots)
        layer, stack = next(v for v in forward.stacked.layers.values() if v[1] is not None)
        kept = stack.a.clone()
        live.load_adapter_as("extra@v1", "up", 1, Store(store))                 # hot add: one new slot
        with warnings.catch_warnings():                                        # "adapter ... was active"
            warnings.simplefilter("ignore", UserWarning)
            live.drop_adapter("down@v1")                                       # unload: its slot freed
        forward.stacked.sync(live.model, live.adapters)
        now = forward.stacked.slots
        assert {k: v for k, v in now.items() if k in slots} == {k: v for k, v in slots.items() if k in now}
        assert ("extra@v1", 1) in now and ("down@v1", 1) not in now
        for key, slot in now.items():
            if key in slots:                                                   # untouched by the change
                assert torch.equal(stack.a[slot], kept[slot])
        assert stack.a[slots[("down@v1", 1)]].abs().sum() == 0 or slots[("down@v1", 1)] == now[("extra@v1", 1)]
        forward.close()
        extra = dataclasses.replace(routes[0], adapter="extra@v1")
        check([extra, routes[1], routes[3], extra, routes[0]])


def test_packed_linear_equals_f_linear():
    """Packed computes F.linear (bias or not, any leading shape, any row count), in bfloat16 too where
    the CPU has it; only float32 (and such bfloat16) CPU nn.Linear layers take it."""
    from torch import nn

    from crma.serve.linear import Packed, PackedGroup, dtypes, packs

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(12, 5, generator=gen), torch.randn(12, generator=gen)
    for x in (torch.randn(5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(2, 40, 5, generator=gen),
              torch.randn(5, 3, generator=gen).T):                          # a non-contiguous input
        for b in (None, bias):
            got, want = Packed(weight, b)(x), torch.nn.functional.linear(x, weight, b)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    if torch.bfloat16 in dtypes():                  # rounded once from float32 accumulation, as F.linear
        half, x = weight.bfloat16(), torch.randn(3, 5, generator=gen).bfloat16()
        got = Packed(half, bias.bfloat16())(x)
        want = torch.nn.functional.linear(x, half, bias.bfloat16())
        assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert packs(nn.Linear(5, 12)) and not packs(nn.Linear(5, 12).to(torch.float16))
    assert packs(nn.Linear(5, 12).to(torch.bfloat16)) == (torch.bfloat16 in dtypes())
    assert not packs(nn.Embedding(5, 12))
    layers = (nn.Linear(5, 12), nn.Linear(5, 4, bias=False), nn.Linear(5, 6))     # one input, stacked outputs
    x, other = torch.randn(3, 5, generator=gen), torch.randn(2, 7, 5, generator=gen)
    group = PackedGroup(layers)
    got = group(x)
    assert [tuple(y.shape) for y in got] == [(3, 12), (3, 4), (3, 6)]
    assert all(torch.allclose(y, layer(x), atol=1e-5) for y, layer in zip(got, layers, strict=True))
    for i in (2, 0, 1):                               # layer by layer, inputs interleaved: each its own part
        assert torch.allclose(group.member(i, x), layers[i](x), atol=1e-5)
        assert torch.allclose(group.member(i, other), layers[i](other), atol=1e-5)
    for i in (0, 1, 2):                               # as transformers calls them: one GEMM for the three
        assert torch.allclose(group.member(i, x), layers[i](x), atol=1e-5)
    assert group._x is None                           # nothing kept once the last layer took its part


def test_float16_packed_linear_is_f_linear_on_float16_rounded_weights(caplog):
    """Packed(half=True) computes x fp16(W)^T + b in float32 (FBGEMM); layers whose weights leave float16's
    range, or that are not float32, keep their own packing; a group packs as float16 only as a whole."""
    from torch import nn

    from crma.serve.linear import Packed, PackedGroup, PackedLinears, half_available, packs_half

    if not half_available():
        pytest.skip("this torch has no FBGEMM")
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(12, 5, generator=gen), torch.randn(12, generator=gen)
    rounded = weight.half().float()
    for x in (torch.randn(5, generator=gen), torch.randn(2, 40, 5, generator=gen), torch.randn(5, 3, generator=gen).T):
        for b in (None, bias):
            got = Packed(weight, b, half=True)(x)
            assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], 12)
            assert torch.allclose(got, torch.nn.functional.linear(x, rounded, b), atol=1e-5)
            assert not torch.allclose(got, torch.nn.functional.linear(x, weight, b), atol=1e-5)   # really rounded
    layers = (nn.Linear(5, 12), nn.Linear(5, 4, bias=False))
    x = torch.randn(3, 5, generator=gen)
    for y, layer in zip(PackedGroup(layers, half=True)(x), layers, strict=True):
        assert torch.allclose(y, torch.nn.functional.linear(x, layer.weight.half().float(), layer.bias), atol=1e-5)
    big = nn.Linear(5, 12)
    with torch.no_grad():
        big.weight[0, 0] = 1e5                                                 # beyond float16's 65504
    assert packs_half(nn.Linear(5, 12)) and not packs_half(big)
    assert not packs_half(nn.Linear(5, 12).to(torch.bfloat16)) and not packs_half(nn.Embedding(5, 12))
    model = nn.Sequential(nn.Linear(5, 12), big, nn.Linear(12, 3))
    linears = PackedLinears(half=True)
    assert linears.install(model, lambda m: [(m[2],)]) == 3
    x = torch.randn(4, 5, generator=gen)
    with torch.inference_mode():
        assert torch.allclose(model[0](x), torch.nn.functional.linear(x, model[0].weight.half().float(),
                                                                       model[0].bias), atol=1e-5)
        assert torch.allclose(big(x), torch.nn.functional.linear(x, big.weight, big.bias), rtol=1e-5)  # float32
    assert big.forward.args[1].half is False and model[0].forward.args[1].half is True
    assert linears.group((model[2],)).packed.half is True
    linears.remove()
    with caplog.at_level(logging.WARNING, logger="crma.serve"):            # nothing can take float16
        assert PackedLinears(half=True).install(nn.Sequential(nn.Linear(5, 3).to(torch.bfloat16))) <= 1
    assert "no linear layer took it" in caplog.text


def test_packed_linears_and_decode_step_serve_the_same_logits(store):
    """MixedForward gives the model's linear layers the packed forward (the LM head and PEFT's base layers
    included) and decodes with its own step (step.py): mixed-adapter prefills and decoding steps give the
    logits of transformers' forward with F.linear; closing the forward restores every layer's own forward;
    under autograd the layers compute F.linear. With float16 weights: the logits of transformers' forward
    on the model whose base linear weights were rounded to float16 (LoRA and CRMA float32)."""
    from crma.serve.batch import BatchCache, new_cache
    from crma.serve.linear import half_available
    from crma.serve.mixed import MixedForward, adapter_linears
    from crma.serve.registry import Registry
    from crma.serve.step import fused_groups

    live = LiveModel.open(Store(store))
    registry = Registry(live, store)
    registry.install(registry.prepare(force=True))
    routes = [registry.current.routes[m] for m in ("up", "base", "down", "zig")]

    def run(mode):
        fast = mode != "off"
        forward, batch, out = MixedForward(live, registry, packed_linears=mode, decode_step=fast), BatchCache(), []
        for k, route in enumerate(routes):
            ids = torch.tensor([list(b"abcdxyzw"[: 3 + k])])
            cache = new_cache(live.model.config)
            out.append(forward(ids, [route], cache)[0])
            batch.add(cache, torch.ones_like(ids), [0])
        patched = list(forward.packed.modules) if fast else []
        if fast:                                   # q|k|v and gate|up of every block packed as one GEMM each
            groups = fused_groups(live.model)
            assert len(forward.packed.groups) == len(groups) == 2 * live.model.config.num_hidden_layers
            assert all(g.packed.half == (mode == "float16") for g in forward.packed.groups.values())
        for _ in range(3):
            mask, positions = batch.step_inputs()
            out.extend(forward(torch.full((len(routes), 1), 97), routes, batch.cache, mask, positions))
            batch.stepped()
        assert (forward._step is not None) == fast                           # the step really decoded
        if fast:
            lm_head = live.model.get_output_embeddings()
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.randn(2, lm_head.in_features, requires_grad=True)
                lm_head(x).sum().backward()                                  # autograd: F.linear's gradient
            assert torch.allclose(x.grad, lm_head.weight.sum(0).expand(2, -1), atol=1e-4)
        forward.close()
        return torch.stack(out), patched

    with torch.inference_mode():
        plain, _ = run("off")
        fast, patched = run("on")
        half = run("float16")[0] if half_available() else None
    every = [m for m in live.model.modules() if type(m) is torch.nn.Linear]
    adapters = adapter_linears(live.model)                                  # PEFT's LoRA A and B: left alone
    linears = [m for m in every if id(m) not in adapters]
    assert len({id(m) for m in patched}) == len(patched) == len(linears) == 7 * live.model.config.num_hidden_layers + 1
    assert len(adapters) > 20
    assert live.model.get_output_embeddings() in patched                    # alone or in a group, once
    assert all("forward" not in m.__dict__ for m in every)                  # close() restored them
    assert (plain - fast).abs().max().item() <= 1e-4 and torch.equal(plain.argmax(-1), fast.argmax(-1))
    if half is not None:
        with torch.no_grad():                      # the base layers' weights as float16 holds them
            for name, m in live.model.named_modules():
                if type(m) is torch.nn.Linear and ".lora_" not in name:
                    m.weight.copy_(m.weight.half().float())
            with torch.inference_mode():
                rounded, _ = run("off")
        assert (plain - half).abs().max().item() > 1e-4                    # the rounding shows
        assert (rounded - half).abs().max().item() <= 1e-4 and torch.equal(rounded.argmax(-1), half.argmax(-1))


@pytest.mark.parametrize("dtype,rows", [("float32", 2), ("bfloat16", 2), ("float32", 1), ("bfloat16", 1)])
def test_one_adapter_lora_as_one_block_diagonal_product_per_group(dtype, rows):
    """Rows that share one adapter get a group's LoRA update as one product with diag(B_q, B_k, B_v) into
    the group's outputs side by side; one row gets it inside gemv.py's kernel for the group (A and
    diag(...)^T folded into its reduction). With LoRA on q and v only (k's block of columns zero) crma's
    decoding step gives PEFT's own logits for that adapter, and rows without an adapter the base model's.
    In bfloat16 the adapter's weights stay float32 (PEFT's default), as does its update, added to the
    bfloat16 outputs as PEFT adds it: equal up to bfloat16's rounding."""
    from crma.config import LoraSettings
    from crma.method.adapters import add_adapter
    from crma.method.models import load_model
    from crma.serve.batch import BatchCache, new_cache
    from crma.serve.linear import PackedLinears
    from crma.serve.lora_rows import StackedLora
    from crma.serve.mixed import adapter_linears
    from crma.serve.step import DecodeStep, fused_groups

    model, _ = load_model("tiny:llama", dtype=getattr(torch, dtype))
    model = add_adapter(model, "dom", LoraSettings(targets=("q_proj", "v_proj", "down_proj")))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    lora, linears = StackedLora(), PackedLinears()
    assert lora.sync(model, {"dom": 1})
    linears.install(model, fused_groups, adapter_linears)
    step = DecodeStep(model, lora, None, linears)
    qkv = step.blocks[0][0]
    for adapter in ("dom", None):
        caches, logits = [BatchCache(), BatchCache()], [[], []]
        with torch.inference_mode():
            for n in (4, 7)[:rows]:
                ids = torch.randint(0, 256, (1, n), generator=gen)
                for batch in caches:
                    cache = new_cache(model.config)
                    if adapter is None:
                        with model.disable_adapter():
                            model(input_ids=ids, cache=cache, use_cache=True)
                    else:
                        model(input_ids=ids, cache=cache, use_cache=True)
                    batch.add(cache, torch.ones_like(ids), [0])
            token = torch.randint(0, 256, (rows, 1), generator=gen)
            for _ in range(3):
                for k, batch in enumerate(caches):
                    mask, positions = batch.step_inputs()
                    if k == 0 and adapter is None:
                        with model.disable_adapter():
                            out = model(input_ids=token, attention_mask=mask, position_ids=positions,
                                        cache=batch.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                    elif k == 0:
                        out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=batch.cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
                    else:
                        with lora.rows_using([adapter] * rows, peft_off=False):
                            out = step(token, batch.cache, mask, positions)
                            weights, update = lora._weights(qkv.modules), lora.row_weights(qkv.modules)
                    logits[k].append(out)
                    batch.stepped()
                token = logits[0][-1].argmax(-1, keepdim=True)
        want, got = torch.stack(logits[0]).float(), torch.stack(logits[1]).float()
        if dtype == "float32":
            assert (want - got).abs().max().item() <= 1e-5 and torch.equal(want.argmax(-1), got.argmax(-1))
        else:
            assert (want - got).abs().max().item() <= 0.05 * want.std().item()
        if adapter is None:
            assert weights is None or lora.rows is None
            assert update is None
            continue
        # whether each block's q|k|v, o, gate|up and down took a fused kernel on one row: LoRA (q, v; down)
        # or an RMSNorm (q|k|v, gate|up) to fold in; o has neither
        folded = [p._fitted.get(False, (None,) * 3)[2] is not None for block in step.blocks for p in block]
        assert folded == [rows == 1 and k != 1 for _ in step.blocks for k in range(4)]
        a, parts, diagonal = weights                      # q and v have LoRA, k does not
        assert a.dtype == torch.float32
        q_out, k_out = (m.out_features for m in qkv.modules[:2])
        assert a.dim() == 2 and [i for i, *_ in parts] == [0, 2]
        assert diagonal.shape == (a.shape[1], sum(m.out_features for m in qkv.modules))
        assert diagonal[:, q_out:q_out + k_out].abs().max() == 0 and diagonal[:, :q_out].abs().max() > 0
    linears.remove()
    lora.close()


@pytest.mark.parametrize("family,grouped,dtype,rows", [("llama", True, "float32", 3), ("mistral", False, "float32", 3),
                                                       ("qwen2", True, "float32", 3), ("qwen2", False, "float32", 3),
                                                       ("qwen2", True, "bfloat16", 3), ("llama", True, "float32", 1),
                                                       ("qwen2", True, "bfloat16", 1)])
def test_decode_step_equals_transformers_forward(family, grouped, dtype, rows):
    """DecodeStep computes transformers' own decoding step (qwen2: biased q/k/v; grouped-query attention),
    with left-padded rows of different lengths and a CRMA backbone at a different version per row; its
    q|k|v and gate|up projections one packed GEMM each (`grouped`) or one GEMM per layer. In bfloat16
    (attention computed in float32, packed bfloat16 GEMMs where the CPU has them) up to bfloat16's rounding.
    One row (grouped) takes gemv.py's kernels, each block's end (down, residual, CRMA) as one."""
    from crma.config import CRMAConfig
    from crma.method.backbone import CRMABackbone
    from crma.method.models import load_model
    from crma.serve.batch import BatchCache, new_cache
    from crma.serve.linear import PackedLinears
    from crma.serve.step import DecodeStep, fused_groups, supports

    model, _ = load_model(f"tiny:{family}", dtype=getattr(torch, dtype))
    assert supports(model)
    linears = PackedLinears() if grouped else None
    if grouped:
        linears.install(model, fused_groups)
    backbone = CRMABackbone.for_model(model, CRMAConfig()).attach(model)
    gen = torch.Generator().manual_seed(1)
    states = {}
    with torch.no_grad():
        for v in (1, 2):
            for block in backbone.crma_blocks:
                block.crma_theta.add_(torch.randn(block.crma_theta.shape, generator=gen))
                block.crma_gate.fill_(0.4 * v)
            states[v] = {k: t.clone() for k, t in backbone.state_dict().items()}
    stack = backbone.stack_versions(states)
    versions = stack.rows([2, 1, 2][:rows])
    step = DecodeStep(model, None, backbone, linears)
    assert all((qkv.packed is not None) == grouped for qkv, *_ in step.blocks)
    caches, logits = [BatchCache(), BatchCache()], [[], []]
    with torch.inference_mode():
        for i, n in enumerate((5, 9, 2)[:rows]):                              # prompts of different lengths
            ids = torch.randint(0, 256, (1, n), generator=gen)
            for batch in caches:
                cache = new_cache(model.config)
                with backbone.per_row(stack, versions[i:i + 1]):
                    model(input_ids=ids, cache=cache, use_cache=True)
                batch.add(cache, torch.ones_like(ids), [0])
    with torch.inference_mode(), backbone.per_row(stack, versions):
        token = torch.randint(0, 256, (rows, 1), generator=gen)
        for _ in range(4):
            for k, batch in enumerate(caches):
                mask, positions = batch.step_inputs()
                if k == 0:
                    out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=batch.cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
                else:
                    out = step(token, batch.cache, mask, positions)
                logits[k].append(out)
                batch.stepped()
            token = logits[0][-1].argmax(-1, keepdim=True)
    want, got = torch.stack(logits[0]).float(), torch.stack(logits[1]).float()  # (steps, rows, vocab)
    keys = [torch.stack([layer.keys for layer in batch.cache.layers]).float() for batch in caches]
    if dtype == "float32":
        assert (want - got).abs().max().item() <= 1e-5 and torch.equal(want.argmax(-1), got.argmax(-1))
        assert torch.allclose(keys[0], keys[1], atol=1e-5)                   # the same keys written in place
    else:                                  # a few bfloat16 roundings apart (want.std(): the logits' spread)
        assert (want - got).abs().max().item() <= 0.05 * want.std().item()
        assert (keys[0] - keys[1]).abs().max() <= 2 ** -6 * keys[0].abs().max()   # two bfloat16 ulps at most
    assert all((block[3]._fitted.get(True, (None,) * 3)[2] is not None) == (grouped and rows == 1)
               for block in step.blocks)
    if grouped:
        linears.remove()


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "phi3"])
def test_decode_step_refuses_other_families(family):
    from crma.method.models import load_model
    from crma.serve.step import supports

    assert not supports(load_model(f"tiny:{family}")[0])
