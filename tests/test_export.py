"""`crma export --to vllm` on tiny real stores, without vLLM: the exported LoRA folders, loaded by PEFT on the
exported base model (with the zero-weight crma_out linears for a modular store), give crma's own logits
for every served model on its pinned (or the latest) backbone; the launch command; a re-export writes
only what changed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from crma.cli import main
from crma.engine.live import LiveModel
from crma.export.lora import ExportError
from crma.export.vllm import ExportConfig, export_store
from crma.export.wrap import add_crma_linears
from crma.store import Store, StoreError
from tests.conftest import write_cycle_domain

TRAIN = ["--model", "tiny:llama", "--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "64",
         "--eval-batch-size", "8", "--min-gain", "-100"]
# a backbone that moves a lot in 3 steps (and an adapter rank below n_streams=4, so the rewrite pads it)
MODULAR = ["--lora-r", "2", "--crma-rho", "0.5", "--crma-lr-gate", "1.0", "--crma-lr-theta", "0.5",
           "--crma-lr-rw", "0.05"]
CYCLES = {"up": "abcd", "down": "dcba", "zig": "xyzw"}
TEXTS = ["abcdabcdabcd xy", "dcbadcba hello there", "xyzwxyzw"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_data")
    for k, (name, cycle) in enumerate(CYCLES.items()):
        write_cycle_domain(root / f"{name}.jsonl", cycle, 16, 300 + k)
        write_cycle_domain(root / f"{name}_hold.jsonl", cycle, 4, 400 + k)
    return root


def add(root: Path, data: Path, name: str, *extra: str) -> None:
    assert main(["add", "--store", str(root), "--domain", name, "--data",
                 f"{data / name}.jsonl:{data / name}_hold.jsonl", *TRAIN, *extra]) == 0


@pytest.fixture(scope="module")
def modular(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_modular") / "s"
    for name in ("up", "down"):
        add(root, data, name, *MODULAR)
    return root


@pytest.fixture(scope="module")
def frozen(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_frozen") / "s"
    for name in ("up", "down"):
        add(root, data, name, "--condition", "frozen")
    return root


def exported_logits(out: Path, record: dict, batch: dict, wrap: bool = True) -> dict[str, torch.Tensor]:
    """{served model: logits} from the export's files alone: plain transformers + PEFT."""
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32).eval()
    if wrap and record["condition"] == "modular":
        add_crma_linears(base)
    got = {}
    with torch.no_grad():
        for model, entry in record["models"].items():
            peft = PeftModel.from_pretrained(base, str(out / record["loras"][entry["lora"]]["path"])).eval()
            got[model] = peft(**batch).logits
            base = peft.unload()
        if record["base_model_name"] not in record["models"]:
            got[record["base_model_name"]] = base(**batch).logits
    return got


def crma_logits(store: Path, models, batch: dict, backbone: str = "pinned") -> dict[str, torch.Tensor]:
    """{model: logits} as crma serves it: the domain's adapter on its pinned (or the latest) backbone."""
    live = LiveModel.open(Store(store))
    out = {}
    with torch.no_grad():
        for model in models:
            with live.using(None if model == "base" else model, backbone=backbone) as m:
                out[model] = m(**batch).logits
    return out


def batch_of(store: Path) -> dict:
    tokenizer = LiveModel.open(Store(store)).tokenizer
    return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))


@pytest.mark.parametrize("backbone", ["pinned", "latest"])
def test_modular_export_gives_crma_logits(modular, tmp_path, backbone):
    out = tmp_path / "vllm"
    record = export_store(ExportConfig(store=modular, out=out, backbone=backbone))
    bb = {"pinned": {"up": 1, "down": 2}, "latest": {"up": 2, "down": 2}}[backbone]
    assert {m: e["backbone_version"] for m, e in record["models"].items()} == {**bb, "base": 2}
    assert set(record["loras"]) == {f"up-v1-bb{bb['up']}", "down-v1-bb2", "base-bb2"}
    batch = batch_of(modular)
    want = crma_logits(modular, record["models"], batch, backbone)
    got = exported_logits(out, record, batch)
    for model in record["models"]:
        assert torch.allclose(got[model], want[model], atol=1e-5, rtol=0), model
    # the rank-2 adapter is padded to the backbone's rank 4, same scaling 16/2
    config = json.loads((out / "loras" / record["models"]["up"]["lora"] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and "crma_out" in config["target_modules"]
    # the backbone matters here: the plain base model, and the adapter without its backbone, are far off
    plain = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(**batch).logits - want["base"]).abs().max() > 1e-2
        alone = PeftModel.from_pretrained(plain, str(modular / "adapters/up/v1")).eval()
        assert (alone(**batch).logits - want["up"]).abs().max() > 1e-2

def test_frozen_export_is_the_stores_adapters_unchanged(frozen, tmp_path):
    out = tmp_path / "vllm"
    record = export_store(ExportConfig(store=frozen, out=out))
    assert record["plugin_architecture"] is None and record["base_model_name"] == "plain"
    assert set(record["models"]) == {"up", "down", "base"} and record["models"]["base"]["lora"] == "base-zero"
    for model, entry in record["models"].items():
        if model == "base":
            continue
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            copied = (out / "loras" / entry["lora"] / f).read_bytes()
            assert copied == (frozen / f"adapters/{model}/v1" / f).read_bytes()
    batch = batch_of(frozen)
    want = crma_logits(frozen, ["up", "down", "base"], batch)
    got = exported_logits(out, record, batch)
    for model in ("up", "down", "base"):
        assert torch.allclose(got[model], want[model], atol=1e-5, rtol=0), model
    assert torch.equal(got["base"], got["plain"])             # `base` is a LoRA that changes nothing


def test_launch_command_and_script(modular, tmp_path):
    out = tmp_path / "vllm"
    assert main(["export", "--store", str(modular), "--to", "vllm", "--out", str(out), "--max-loras", "2"]) == 0
    record = json.loads((out / "export.json").read_text())
    argv = record["command"]
    assert argv[:3] == ["vllm", "serve", str(out.resolve() / "base")]
    opts = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert opts["--served-model-name"] == "plain" and opts["--max-loras"] == "2" and opts["--max-lora-rank"] == "8"
    assert json.loads(opts["--hf-overrides"]) == {"architectures": ["CrmaLlamaForCausalLM"]}
    start = argv.index("--lora-modules") + 1
    modules = dict(a.split("=", 1) for a in argv[start:start + 3])
    assert modules == {m: str(out.resolve() / "loras" / e["lora"]) for m, e in record["models"].items()}
    assert record["manifest"]["updated"] == json.loads((modular / "manifest.json").read_text())["updated"]
    # launch.sh runs that command from wherever the export is moved, passing extra arguments on
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "vllm").write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                               "print(json.dumps([os.environ.get('VLLM_ALLOW_RUNTIME_LORA_UPDATING'), "
                               "*sys.argv[1:]]))\n")
    (fake / "vllm").chmod(0o755)
    run = subprocess.run([str(moved / "launch.sh"), "--port", "8001"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    env, *args = json.loads(run.stdout)
    assert env == "True"
    assert args == [a.replace(str(out.resolve()), str(moved.resolve())) for a in argv[1:]] + ["--port", "8001"]


def test_reexport_writes_only_what_changed(modular, data, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(modular, store)
    out = tmp_path / "vllm"
    first = export_store(ExportConfig(store=store, out=out))
    assert first["written"] == ["base", "loras/up-v1-bb1", "loras/down-v1-bb2", "loras/base-bb2"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert export_store(ExportConfig(store=store, out=out))["written"] == []
    add(store, data, "zig", *MODULAR)
    again = export_store(ExportConfig(store=store, out=out))
    assert again["written"] == ["loras/zig-v1-bb3", "loras/base-bb3"]
    assert again["kept"] == ["base", "loras/up-v1-bb1", "loras/down-v1-bb2"]
    assert again["stale"] == ["base-bb2"]
    assert [h["lora_name"] for h in again["hot_add"]] == ["zig", "base"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())        # kept files were not rewritten
    assert "zig=" in (out / "launch.sh").read_text()
    # a kept folder whose file was changed is written again
    (out / "loras/up-v1-bb1/adapter_config.json").write_text("{}")
    assert export_store(ExportConfig(store=store, out=out))["written"] == ["loras/up-v1-bb1"]
    assert not list(out.rglob(".*"))                                         # no temp folders left


def test_clear_errors(modular, tmp_path, capsys):
    with pytest.raises(StoreError, match="no such store"):
        export_store(ExportConfig(store=tmp_path / "missing", out=tmp_path / "o"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a crma export"):
        export_store(ExportConfig(store=modular, out=tmp_path / "busy"))
    with pytest.raises(ExportError, match="inside the store"):
        export_store(ExportConfig(store=modular, out=modular / "vllm"))
    with pytest.raises(ExportError, match="also the name of an exported LoRA"):
        export_store(ExportConfig(store=modular, out=tmp_path / "o", served_name="base"))
    assert main(["export", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "crma export: error:" in capsys.readouterr().err


def test_modular_store_of_another_family_is_refused(data, tmp_path, capsys):
    root = tmp_path / "qwen"
    add(root, data, "up", "--model", "tiny:qwen2")
    assert main(["export", "--store", str(root), "--to", "vllm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Qwen2ForCausalLM cannot be served by vLLM" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o" / "export.json").exists()
