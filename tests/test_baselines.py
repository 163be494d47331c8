"""The continual-learning baselines (crma/baselines): each mechanism on its own, then end to end on a
tiny real model. The smoke grid with every condition runs in tests/test_bench.py."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from crma.baselines import make_method
from crma.baselines.base import summed_adapters
from crma.baselines.ewc import EWC, diagonal_fisher, ewc_penalty
from crma.baselines.olora import OLoRA, lora_layers, orthogonality
from crma.baselines.replay import Reservoir, mix
from crma.bench.grid import SMOKE, plan_grid
from crma.cli import main
from crma.config import CLConfig, ConfigError, LoraSettings, TrainConfig
from crma.data import text_example
from crma.engine.add import load_spec
from crma.engine.loss import mean_loss, passage_losses
from crma.method.adapters import active, adapter_of, add_adapter, load_adapter, set_trainable
from crma.method.models import load_model

from .conftest import tiny_run_config


def tiny_with_adapters(*names, family="llama", random_b=True):
    """tiny model with LoRA adapters `names`; B random (nonzero deltas) unless random_b is False."""
    model, tok = load_model(f"tiny:{family}")
    for k, name in enumerate(names):
        torch.manual_seed(k)
        model = add_adapter(model, name, LoraSettings())
        if random_b:
            with torch.no_grad():
                for layer in lora_layers(model):
                    layer.lora_B[name].weight.normal_(0, 0.05)
    return model, tok


def passages(n=3, length=24, seed=0):
    rng = random.Random(seed)
    return [text_example([rng.randrange(256) for _ in range(length)]) for _ in range(n)]


def adapter_params(model, name):
    return {n: p for n, p in model.named_parameters() if adapter_of(n) == name}


# ---- EWC ----------------------------------------------------------------------------------------
def test_fisher_is_nonnegative_with_the_adapters_shapes_and_zero_without_gradient():
    model, tok = tiny_with_adapters("one", "two", random_b=False)      # fresh adapters: B = 0
    model.set_adapter("one")
    set_trainable(model, "one", backbone=False)
    params = adapter_params(model, "one")
    other = adapter_params(model, "two")                              # not active: no path to the loss
    for p in other.values():
        p.requires_grad_(True)
    both = {**params, **other}
    for estimate in ("empirical", "sampled"):
        F = diagonal_fisher(model, passages(), both, estimate, seed=1, pad_id=tok.pad_token_id)
        assert set(F) == set(both) and all(F[n].shape == both[n].shape for n in both)
        assert all((f >= 0).all() for f in F.values())
        assert all(torch.count_nonzero(F[n]) == 0 for n in other)             # no gradient: exactly zero
        assert all(torch.count_nonzero(F[n]) == 0 for n in params if "lora_A" in n)   # B = 0: A gets none
        assert sum(float(F[n].sum()) for n in params if "lora_B" in n) > 0
    with torch.no_grad():                                           # once B moves, A's weights matter too
        for layer in lora_layers(model):
            layer.lora_B["one"].weight.normal_(0, 0.05)
    F = diagonal_fisher(model, passages(), params, "empirical", pad_id=tok.pad_token_id)
    assert all(float(F[n].sum()) > 0 for n in params)
    sampled = [diagonal_fisher(model, passages(), params, "sampled", seed=s, pad_id=tok.pad_token_id)
               for s in (3, 3, 4)]
    assert all(torch.equal(sampled[0][n], sampled[1][n]) for n in params)      # seeded: reproducible
    assert any(not torch.equal(sampled[0][n], sampled[2][n]) for n in params)
    assert any(not torch.equal(sampled[0][n], F[n]) for n in params)            # not the gold-token estimate


def test_ewc_penalty_is_the_weighted_quadratic_and_zero_at_the_anchor():
    theta = {"w": torch.tensor([1.0, 2.0, 3.0], requires_grad=True)}
    fishers = [{"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([0.5, 0.5, 0.5])}]
    anchors = [{"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([1.0, 2.0, 3.0])}]
    pen = ewc_penalty(theta, fishers, anchors, lam=4.0)
    assert float(pen.detach()) == pytest.approx(0.5 * 4.0 * (0 + 0 + 2 * 1.0) + 0.0)   # only phase 0, third weight
    pen.backward()
    assert theta["w"].grad.tolist() == pytest.approx([0.0, 0.0, 4.0 * 2 * 1.0])  # lam F (theta - anchor)
    assert float(ewc_penalty(theta, fishers[1:], anchors[1:], 4.0).detach()) == 0.0
    ewc = EWC(CLConfig(), seed=0, n_phases=3)
    assert ewc.penalty() is None                                     # phase 0: nothing to protect yet


# ---- replay -------------------------------------------------------------------------------------
def test_reservoir_keeps_its_size_and_a_uniform_domain_mix():
    res = Reservoir(20, seed=0)
    for i in range(10):
        res.offer(("a", f"a{i}", [i]))
    assert len(res.items) == 10 and res.domains() == {"a": 10}       # fewer than size: keeps everything
    for i in range(10, 100):
        res.offer(("a", f"a{i}", [i]))
    for i in range(100):
        res.offer(("b", f"b{i}", [i]))
    assert len(res.items) == 20 and res.seen == 200 and sum(res.domains().values()) == 20
    assert len({t for _, t, _ in res.items}) == 20                   # no passage kept twice
    again = Reservoir(20, seed=0)
    for item in [("a", f"a{i}", [i]) for i in range(100)] + [("b", f"b{i}", [i]) for i in range(100)]:
        again.offer(item)
    assert again.items == res.items                                  # deterministic given the seed
    counts = []
    for seed in range(300):                                          # each item kept with probability 20/200
        r = Reservoir(20, seed)
        for i in range(200):
            r.offer(("a" if i < 100 else "b", str(i), [i]))
        counts.append(r.domains().get("a", 0))
    assert 9.5 < sum(counts) / len(counts) < 10.5 and min(counts) > 0


def test_mix_interleaves_the_buffer_at_the_ratio_and_keeps_the_new_order():
    new, buf = list(range(12)), ["x", "y", "z"]
    out = mix(new, buf, 0.25, random.Random(0))
    assert len(out) == 16 and [v for v in out if isinstance(v, int)] == new
    assert all(sum(isinstance(v, str) for v in out[k:k + 4]) == 1 for k in range(0, 16, 4))   # 3 new + 1 old
    assert sorted(out[3::4][:3]) == buf                              # without replacement until used up
    assert mix(new, [], 0.25, random.Random(0)) == new and mix(new, buf, 0.0, random.Random(0)) == new
    assert len(mix(list(range(100)), buf, 0.5, random.Random(0))) == 200


# ---- O-LoRA -------------------------------------------------------------------------------------
def test_orthogonality_penalty_is_zero_for_orthogonal_subspaces_and_grows_with_overlap():
    q, _ = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))   # (16, 8) orthonormal
    prev, perp = q[:, :4].T, q[:, 4:].T                                  # two (r=4, in=16) row spaces, orthogonal
    assert float(orthogonality(prev, perp)) < 1e-12
    values = []
    for angle in (0.0, 0.3, 0.7, 1.2, math.pi / 2):
        a_new = math.cos(angle) * perp + math.sin(angle) * prev            # rotated towards the earlier subspace
        values.append(float(orthogonality(prev, a_new)))
        assert values[-1] == pytest.approx(4 * math.sin(angle) ** 2, abs=1e-5)   # ||sin(angle) I_4||_F^2
    assert values == sorted(values) and values[-1] > 3.9
    stacked = torch.cat([prev, perp])                                      # two earlier tasks: the sum over i
    assert float(orthogonality(stacked, prev)) == pytest.approx(float(orthogonality(prev, prev)), rel=1e-6)


def test_olora_penalty_on_a_model_vanishes_when_new_rows_are_orthogonal():
    model, _ = tiny_with_adapters("old", "new")
    method = OLoRA(CLConfig(olora_lambda1=0.5), seed=0, n_phases=2)
    method.trained = ["old"]
    live = SimpleNamespace(model=model)
    with torch.no_grad():                            # project the old rows out of every new A
        for layer in lora_layers(model):
            a_old, a_new = layer.lora_A["old"].weight, layer.lora_A["new"].weight     # (r, in)
            proj = a_new @ torch.linalg.pinv(a_old) @ a_old
            a_new -= proj
    method.begin_phase(live, "new", set_trainable(model, "new", backbone=False))
    assert float(method.penalty().detach()) < 1e-9
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A["new"].weight.copy_(layer.lora_A["old"].weight)
    expected = 0.5 * sum(float((layer.lora_A["old"].weight @ layer.lora_A["old"].weight.T).pow(2).sum())
                         for layer in lora_layers(model))
    assert float(method.penalty().detach()) == pytest.approx(expected, rel=1e-5) and expected > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_summed_inference_equals_the_sum_of_the_separate_deltas(family):
    model, _ = tiny_with_adapters("one", "two", "three", family=family)
    ids = torch.tensor([x.ids for x in passages(2, 16)])
    layer = lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    before = model.active_adapter
    with torch.no_grad():
        with model.disable_adapter():
            base = layer(x)
        deltas = []
        for name in ("one", "two"):
            with active(model, name):
                deltas.append(layer(x) - base)
        with summed_adapters(model, ["one", "two"]):
            both = layer(x)
            logits = model(input_ids=ids).logits
    assert torch.allclose(both - base, deltas[0] + deltas[1], atol=1e-6)
    # the whole model: base weights plus both adapters' delta weights, merged by hand
    merged, _ = load_model(f"tiny:{family}")
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if module in lora_layers(model):
                target = merged.get_submodule(name)
                target.weight += module.get_delta_weight("one") + module.get_delta_weight("two")
        assert torch.allclose(logits, merged(input_ids=ids).logits, atol=1e-5)
    assert model.active_adapter == before and not any(p.requires_grad for p in model.parameters())   # restored


# ---- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_runs(conflicting_domains, tmp_path_factory):
    from crma.engine.run import continual_run
    root = tmp_path_factory.mktemp("baselines")
    runs = {}
    for c in ("ewc", "replay", "olora"):
        cfg = tiny_run_config(conflicting_domains, root / c, c)
        runs[c] = continual_run(cfg, progress=False) | {"_dir": root / c}
    return runs


def test_olora_saved_adapters_summed_reproduce_the_runs_final_losses(baseline_runs, conflicting_domains):
    """The adapter saved after phase 0 was not touched by phase 1, and summing the saved PEFT adapters
    reproduces the run's final row, for every domain (no router)."""
    res = baseline_runs["olora"]
    model, tok = load_model("tiny:llama")
    for name in ("up", "down"):
        model = load_adapter(model, name, res["_dir"] / "adapters" / name / "v1")
    for j, spec in enumerate(conflicting_domains):
        ids = load_spec(spec, tok, TrainConfig(max_len=64)).holdout            # as the run read it
        with summed_adapters(model, ["up", "down"]):
            loss = mean_loss(passage_losses(model, ids, 8, tok.pad_token_id, progress=False))
        assert abs(loss - res["loss_matrix"][-1][j]) < 1e-5
    assert res["storage"]["adapters"] == 2 and res["storage"]["extra_bytes"] == 0
    start, end = res["storage"]["orthogonality_start_end"][0]
    assert end < start                                               # training pushed the new A's away
    assert res["phases"][1]["penalty_first"] > 0 and "penalty_first" not in res["phases"][0]


def test_ewc_and_replay_results_say_what_they_store(baseline_runs):
    ewc, replay = baseline_runs["ewc"]["storage"], baseline_runs["replay"]["storage"]
    assert ewc["phases_stored"] == 1 and ewc["bytes_per_phase"] == 8 * ewc["adapter_params"] > 0
    assert ewc["extra_bytes"] == ewc["bytes_per_phase"] and len(ewc["fisher_nonzero_fraction"]) == 1
    assert ewc["adapter_params"] == 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))   # 2 layers, r = 8
    assert replay["passages_kept_as_text"] == 80 and replay["passages_per_domain"] == {"up": 40, "down": 40}
    assert replay["replayed_per_phase"][0] == 0 and replay["replayed_per_phase"][1] > 0
    assert replay["text_bytes"] > 80 * 40
    # phase 0 has nothing to protect or replay: it is naive's phase 0, to the bit
    assert baseline_runs["ewc"]["loss_curves"][0] == baseline_runs["replay"]["loss_curves"][0]
    assert baseline_runs["ewc"]["phases"][1]["penalty_first"] == 0.0                     # theta starts at the anchor
    assert baseline_runs["ewc"]["phases"][1]["penalty_last"] > 0


def test_cl_settings_are_validated_recorded_and_refused_by_crma_add(conflicting_domains, tmp_path, capsys):
    for bad in ({"ewc_fisher": "exact"}, {"replay_ratio": 1.0}, {"replay_buffer": 0}, {"olora_lambda1": -1.0},
                {"ewc_lambda": -1.0}):
        with pytest.raises(ConfigError):
            CLConfig(**bad)
    up, down = conflicting_domains
    out = tmp_path / "ewc"
    assert main(["run", "--model", "tiny:llama", "--domains", f"up={up.train}:{up.holdout}",
                 f"down={down.train}:{down.holdout}",
                 "--condition", "ewc", "--out", str(out), "--epochs", "1", "--max-len", "32", "--max-passages", "8",
                 "--cl-ewc-lambda", "10", "--cl-ewc-fisher", "sampled", "--cl-ewc-fisher-passages", "4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["cl"]["ewc_lambda"] == 10.0 and res["storage"]["fisher_estimate"] == "sampled"
    assert res["storage"]["settings"] == {"ewc_lambda": 10.0, "ewc_fisher": "sampled", "ewc_fisher_passages": 4}
    assert "stores: 1 shared LoRA" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["condition"] == "ewc"
    assert main(["add", "--store", str(out), "--domain", "more", "--data", f"{up.train}:{up.holdout}",
                 "--model", "tiny:llama", "--max-len", "32"]) == 2
    assert "exists for `crma run`" in capsys.readouterr().err


def test_baseline_settings_define_only_their_own_runs(tmp_path):
    """Like CRMA settings for modular: a finished frozen or replay run stays valid when --cl-ewc-* changes,
    a finished ewc run made with another lambda is refused."""
    for cond in ("frozen", "ewc", "replay"):
        cfg = plan_grid(SMOKE, tmp_path, conditions=[cond], seeds=[0])[0][0]
        cfg.out.mkdir(parents=True)
        (cfg.out / "results.json").write_text(json.dumps({"finished": True, "config": cfg.to_dict()}))
    other = CLConfig(ewc_lambda=1.0)
    plan = plan_grid(SMOKE, tmp_path, conditions=["frozen", "replay"], seeds=[0], resume=True, cl=other)
    assert [done for _, done in plan] == [True, True]
    with pytest.raises(ConfigError, match="other settings"):
        plan_grid(SMOKE, tmp_path, conditions=["ewc"], seeds=[0], resume=True, cl=other)
    core = make_method(plan[0][0].condition)                 # core conditions: the plain method, adding nothing
    assert type(core).__name__ == "Method" and core.name == "frozen"
    assert core.penalty() is None and core.storage() is None
    assert core.phase_examples([text_example([1, 2])], None, 0) is None
