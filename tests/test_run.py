"""Continual runs on a tiny real model: the three conditions, isolation, results, PEFT round trips."""
import json

import torch
from peft import PeftModel

from crma.baselines import make_method
from crma.cli import main
from crma.config import CRMAConfig, LoraSettings, TrainConfig
from crma.data import build_examples, read_records
from crma.engine.add import load_spec
from crma.engine.loss import mean_loss, passage_losses
from crma.engine.train import train_phase
from crma.method.adapters import add_adapter, set_trainable
from crma.method.backbone import CRMABackbone
from crma.method.models import load_model

REQUIRED_KEYS = {"model", "condition", "seed", "domains", "base_loss", "loss_matrix", "drift_pct",
                 "per_domain_drift_pct", "gain_pct", "train_tokens", "train_seconds", "grad_norm",
                 "spectral", "config", "command", "version", "bwt", "retention", "passage_losses"}


def holdout_ids(spec, tokenizer, max_len=64):
    """The holdout examples exactly as the run read them (duplicates of training passages removed)."""
    return load_spec(spec, tokenizer, TrainConfig(max_len=max_len)).holdout


def test_naive_forgets_and_frozen_does_not(conflict_runs):
    naive, frozen, modular = (conflict_runs[c] for c in ("naive", "frozen", "modular"))
    assert naive["gain_pct"][0] > 5                   # the first domain was really learned...
    assert naive["drift_pct"] > 10                    # ...and then clearly forgotten
    assert frozen["drift_pct"] == 0.0                 # adapters untouched, base untouched: exactly 0
    assert frozen["loss_matrix"][1][0] == frozen["loss_matrix"][0][0]
    assert modular["drift_pct"] < naive["drift_pct"] / 5
    for res in (naive, frozen, modular):
        assert REQUIRED_KEYS <= set(res) and res["finished"]
    for res in (naive, frozen):                       # an untrained domain is served by the untouched base
        assert res["loss_matrix"][0][1] == res["base_loss"][1]
    assert modular["loss_matrix"][0][1] != modular["base_loss"][1]   # ...or by the base plus the moved backbone


def test_results_file_and_artifacts_on_disk(conflict_runs):
    run_dir = conflict_runs["modular"]["_dir"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["domains"] == ["up", "down"] and len(saved["loss_matrix"]) == 2
    assert saved["config"]["condition"] == "modular" and saved["config"]["crma"]["n_streams"] == 4
    config = json.loads((run_dir / "config.json").read_text())
    assert config.pop("runtime") == saved["runtime"] and config == saved["config"]
    from crma import runtime
    from crma.config import DeviceConfig
    assert saved["runtime"]["num_processes"] == 1 and saved["config"]["device"]["device"] == "auto"
    assert saved["runtime"]["resolved_device"].startswith(runtime.resolve_device(DeviceConfig()))
    assert saved["runtime"]["resolved_dtype"] == str(runtime.resolve_dtype(DeviceConfig())).split(".")[-1]
    for name in ("up", "down"):
        assert (run_dir / "adapters" / name / "v1" / "adapter_config.json").exists()
        assert (run_dir / "adapters" / name / "v1" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "backbone").iterdir()) == ["v1", "v2"]   # one per phase
    assert not (conflict_runs["frozen"]["_dir"] / "backbone").exists()
    assert sorted(p.name for p in (conflict_runs["naive"]["_dir"] / "adapters" / "shared").iterdir()) == ["v1", "v2"]
    assert [g["peak"] >= g["mean"] > 0 for g in saved["grad_norm"]] == [True, True]


def test_spectral_log_summary(conflict_runs):
    res = conflict_runs["modular"]
    spec = res["spectral"]
    assert spec["certificate_ok"] is True
    assert spec["max_sum_dev"] <= 1e-6 and spec["max_norm_dev"] <= 1e-6
    assert spec["max_alpha_times_norm"] <= spec["rho"]
    assert spec["steps"] == sum(p["steps"] for p in res["phases"]) and spec["layers"] == 2
    assert spec["max_alpha"] > 0                      # the gate really trained
    lines = (res["_dir"] / "spectral_log.jsonl").read_text().splitlines()
    assert len(lines) == spec["steps"] + len(res["phases"])   # every step plus each phase's start
    assert conflict_runs["frozen"]["spectral"] is None


def test_saved_adapter_loads_in_plain_peft_and_reproduces_the_loss(conflict_runs, conflicting_domains):
    res = conflict_runs["frozen"]
    base, tok = load_model("tiny:llama", seed=0)
    model = PeftModel.from_pretrained(base, str(res["_dir"] / "adapters" / "up" / "v1"))
    loss = mean_loss(passage_losses(model, holdout_ids(conflicting_domains[0], tok), 8, tok.pad_token_id,
                                    progress=False))
    assert abs(loss - res["loss_matrix"][-1][0]) < 1e-5


def test_modular_round_trip_backbone_plus_adapter(conflict_runs, conflicting_domains):
    res = conflict_runs["modular"]
    base, tok = load_model("tiny:llama", seed=0)
    CRMABackbone.load(res["_dir"] / "backbone" / "v2", base).attach(base)
    model = PeftModel.from_pretrained(base, str(res["_dir"] / "adapters" / "down" / "v1"))
    loss = mean_loss(passage_losses(model, holdout_ids(conflicting_domains[1], tok), 8, tok.pad_token_id,
                                    progress=False))
    assert abs(loss - res["loss_matrix"][-1][1]) < 1e-5


def test_old_adapter_is_bit_for_bit_unchanged_while_backbone_trains(conflicting_domains):
    from accelerate import Accelerator

    model, tok = load_model("tiny:gpt2")
    backbone = CRMABackbone.for_model(model, CRMAConfig()).attach(model)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, max_len=64)
    snapshots = []
    for i, spec in enumerate(conflicting_domains):
        model = add_adapter(model, spec.name, LoraSettings())
        lora = set_trainable(model, spec.name, backbone=True)
        model.set_adapter(spec.name)
        examples = build_examples(read_records(spec.train), tok, 64, "truncate")[0]
        train_phase(model, examples, cfg, seed=i, domain=spec.name,
                    adapter=spec.name, lora_params=lora, backbone=backbone, accelerator=Accelerator(),
                    pad_id=tok.pad_token_id, method=make_method("modular"))
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if ".up." in n})
    first, last = snapshots
    assert first and all(torch.equal(first[n], last[n]) for n in first)
    theta = backbone.crma_blocks[0].crma_theta
    assert not torch.equal(theta, torch.eye(4) * CRMAConfig().theta_init)   # the backbone did move


def test_cli_run_end_to_end(conflicting_domains, tmp_path, capsys):
    up, down = conflicting_domains
    out = tmp_path / "cli"
    code = main(["run", "--model", "tiny:phi3", "--domains", f"up={up.train}:{up.holdout}", f"down={down.train}",
                 "--condition", "modular", "--seed", "7", "--out", str(out), "--epochs", "1", "--max-len", "48",
                 "--lora-r", "4", "--crma-rho", "0.2"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 7 and res["config"]["lora"]["r"] == 4 and res["config"]["crma"]["rho"] == 0.2
    assert res["config"]["train"]["max_len"] == 48 and res["model"] == "tiny:phi3"
    assert res["command"].startswith("crma run --model tiny:phi3 --domains") and "--crma-rho 0.2" in res["command"]
    assert "drift (mean over prior domains)" in capsys.readouterr().out


def test_cli_names_a_foreign_base_model_instead_of_crashing(conflict_runs, tmp_path, capsys):
    """A store whose manifest names another base model: exit code 2 and the mismatch named."""
    import shutil
    run_dir = conflict_runs["modular"]["_dir"]
    assert main(["route", "--store", str(run_dir), "abcdabcd"]) == 0     # the run's own model: routes fine
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["model"]["fingerprint"]["weights_bf16_sha256"] = "0" * 16
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    assert main(["route", "--store", str(foreign), "abcdabcd"]) == 2
    assert "the store was built on base model" in capsys.readouterr().err


def test_isolation_with_domains_named_like_modules():
    """Adapter names that are also parts of parameter names must not capture other adapters' weights,
    and activating adapters never leaves a frozen adapter with gradients on."""
    from crma.method.adapters import active, adapter_of
    model, _ = load_model("tiny:llama")
    for name in ("model", "layers", "q_proj", "mlp"):
        model = add_adapter(model, name, LoraSettings())
    for name in ("model", "layers", "q_proj", "mlp"):
        lora = set_trainable(model, name, backbone=False)
        grads = {adapter_of(n) for n, p in model.named_parameters() if p.requires_grad}
        assert grads == {name} and len(lora) == 2 * 7 * 2          # A and B, 7 targets, 2 layers
    set_trainable(model, None, backbone=False)
    for name in ("model", "layers"):
        with active(model, name):
            with active(model, "q_proj"):
                pass
    assert not any(p.requires_grad for p in model.parameters())
