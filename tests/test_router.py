"""The router (issue 4) on a tiny real model: accuracy, incremental == from scratch, no text saved,
abstention on random strings, save/load, features that ignore adapters and the backbone, the CLI."""
import json
import random
import string

import pytest
import torch

from crma.method.adapters import add_adapter
from crma.method.backbone import CRMABackbone
from crma.cli import main
from crma.config import ConfigError, CRMAConfig, LoraSettings
from crma.routing.features import domain_features, hidden_features, text_segments
from crma.method.models import load_model
from crma.routing.router import BASE, STRATEGIES, Router, RouterConfig, RouterError

VOCAB = {   # three clearly separable synthetic domains (different byte sets for the byte tokenizer)
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum kiwi fig lime date".split(),
    "digits": [str(n) for n in (314, 159, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419, 716)],
    "shout": "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIETT KILO LIMA".split(),
}
CFG = RouterConfig(layer=2, min_words=4, segments_per_passage=4)


def sentences(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB[domain]) for _ in range(rng.randint(8, 14))) + "." for _ in range(n)]


def passages(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentences(domain, 4, rng.randrange(10**6))) for _ in range(n)]


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation
    return ["".join(rng.choice(chars) for _ in range(rng.randint(20, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matrices: one thread is faster and immune to a busy CPU
    yield load_model("tiny:llama", seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feats(tiny):
    """Per domain: train features (from passages), holdout features, query features."""
    model, tok = tiny
    out = {}
    for k, d in enumerate(VOCAB):
        out[d] = {"train": domain_features(model, tok, passages(d, 30, k), CFG, 0),
                  "hold": domain_features(model, tok, passages(d, 10, 100 + k), CFG, 0),
                  "query": hidden_features(model, tok, sentences(d, 20, 200 + k), CFG.layer)}
    return out


def build(feats, order, cfg=CFG) -> Router:
    router = Router(cfg)
    for d in order:
        router.add_domain(d, feats[d]["train"], feats[d]["hold"])
    return router


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_separates_synthetic_domains(feats, strategy):
    cfg = RouterConfig(**{**vars(CFG), "strategy": strategy})
    router = build(feats, list(VOCAB), cfg)
    for d in VOCAB:
        best = [dec.best for dec in router.route_batch(feats[d]["query"])]
        assert best.count(d) / len(best) >= 0.95, (strategy, d, best)


def test_default_router_accuracy_counts_abstentions_as_wrong(feats):
    router = build(feats, list(VOCAB))
    decisions = {d: router.route_batch(feats[d]["query"]) for d in VOCAB}
    correct = sum(dec.domain == d for d in VOCAB for dec in decisions[d])
    assert correct / sum(len(v) for v in decisions.values()) >= 0.95
    dec = decisions["fruit"][0]
    assert dec.runner_up in VOCAB and dec.runner_up != dec.best
    assert 0 < dec.runner_up_confidence <= dec.confidence <= 1


def test_random_strings_go_to_base(tiny, feats):
    model, tok = tiny
    router = build(feats, list(VOCAB))
    noise = router.route_batch(hidden_features(model, tok, random_strings(40, 7), CFG.layer))
    assert sum(dec.domain == BASE for dec in noise) / len(noise) >= 0.9
    assert all(dec.ood_ratio > 1 or dec.reason for dec in noise if dec.domain == BASE)


def test_incremental_add_equals_building_from_scratch(feats, tmp_path):
    scratch = build(feats, list(VOCAB))
    partial = build(feats, ["fruit", "digits"])
    partial.save(tmp_path)
    grown = Router.load(tmp_path).add_domain("shout", feats["shout"]["train"], feats["shout"]["hold"])
    assert grown.names == scratch.names and grown.calibration == scratch.calibration
    assert set(grown.t) == set(scratch.t)
    for key in scratch.t:
        assert torch.equal(grown.t[key], scratch.t[key]), key
    # another order: the same statistics per domain, the same decisions
    shuffled = build(feats, ["shout", "fruit", "digits"])
    for key in scratch.t:
        for d in VOCAB:
            assert torch.equal(shuffled.t[key][shuffled.names.index(d)], scratch.t[key][scratch.names.index(d)])
    queries = torch.cat([feats[d]["query"].pooled for d in VOCAB])
    a, b = scratch.route_batch(queries), shuffled.route_batch(queries)
    assert [x.domain for x in a] == [x.domain for x in b]
    assert all(abs(x.confidence - y.confidence) < 1e-9 for x, y in zip(a, b))


def test_saved_router_holds_no_text(feats, tmp_path):
    router = build(feats, list(VOCAB))
    folder = router.save(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["router.json", "router.safetensors"]
    blob = b"".join(p.read_bytes() for p in folder.iterdir())
    words = [w for v in VOCAB.values() for w in v if len(w) >= 4] + ["ALPHA BRAVO", "apple banana"]
    leaked = [w for w in words if w.encode() in blob or w.lower().encode() in blob]
    assert leaked == []
    info = json.loads((folder / "router.json").read_text())
    assert set(info) == {"format", "config", "dim", "domains", "adapters", "calibration", "meta"}


def test_save_load_round_trip(feats, tmp_path):
    router = build(feats, list(VOCAB), RouterConfig(**{**vars(CFG), "strategy": "kproto"}))
    router.meta["layer"] = 2
    router.save(tmp_path)
    loaded = Router.load(tmp_path / "router")
    assert loaded.cfg == router.cfg and loaded.meta == router.meta and loaded.adapters == router.adapters
    queries = torch.cat([feats[d]["query"].pooled for d in VOCAB])
    assert loaded.route_batch(queries) == router.route_batch(queries)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Router.load(tmp_path / "nowhere")
    (tmp_path / "router" / "router.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RouterError, match="not a crma router"):
        Router.load(tmp_path)


def test_settings_are_validated(feats):
    with pytest.raises(ConfigError, match="router.strategy"):
        RouterConfig(strategy="nearest")
    with pytest.raises(ConfigError, match="router.quantile"):
        RouterConfig(quantile=0)
    router = build(feats, ["fruit"])
    with pytest.raises(RouterError, match="already"):
        router.add_domain("fruit", feats["fruit"]["train"])
    with pytest.raises(RouterError, match="reserved"):
        router.add_domain(BASE, feats["fruit"]["train"])
    with pytest.raises(RouterError, match="feature size"):
        router.add_domain("other", torch.zeros(5, 3))


def test_features_ignore_adapters_and_backbone(tiny):
    model, tok = load_model("tiny:llama", seed=1)
    texts = sentences("fruit", 4, 0) + ["x"]
    before = hidden_features(model, tok, texts, 2)
    backbone = CRMABackbone.for_model(model, CRMAConfig(), seed=0).attach(model)
    model = add_adapter(model, "fruit", LoraSettings(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "crma_gate" in name:
                p.fill_(0.5)                     # adapters and backbone now change the forward pass
    after = hidden_features(model, tok, texts, 2)
    assert torch.equal(before.pooled, after.pooled)
    assert torch.equal(before.chars_per_token, after.chars_per_token)
    ids = tok(texts[:1], return_tensors="pt")["input_ids"]
    plain = load_model("tiny:llama", seed=1)[0]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert backbone.enabled                      # the bypass was undone


def test_text_segments_are_query_sized():
    prose = "One two three four five six. Seven eight nine ten eleven twelve thirteen! Tail a b."
    assert text_segments(prose, min_words=5) == ["One two three four five six.",
                                                 "Seven eight nine ten eleven twelve thirteen!", "Tail a b."]
    code = "def f(x):\n    return x\n\nclass A:\n    pass"
    assert text_segments(code, min_words=4, max_segments=1) == ["def f(x):\nreturn x"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """A frozen and a naive 2-domain run of tiny:llama on the synthetic domains, plus a corpus folder."""
    root = tmp_path_factory.mktemp("routed")
    corpus = root / "corpus"
    for k, d in enumerate(VOCAB):
        (corpus / d).mkdir(parents=True)
        for split, texts in (("train", passages(d, 16, k)), ("holdout", passages(d, 6, 50 + k)),
                             ("queries", sentences(d, 10, 60 + k))):
            (corpus / d / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for condition in ("frozen", "naive"):
        args = ["run", "--model", "tiny:llama", "--condition", condition, "--out", str(root / condition),
                "--epochs", "1", "--max-len", "64", "--router-layer", "2", "--router-min-words", "4",
                "--domains"] + [f"{d}={corpus / d / 'train.jsonl'}:{corpus / d / 'holdout.jsonl'}"
                                for d in ("fruit", "digits")]
        assert main(args) == 0
        out[condition] = root / condition
    return out, corpus


def test_run_writes_router_and_cli_routes(runs, capsys):
    dirs, _ = runs
    frozen = Router.load(dirs["frozen"])
    assert frozen.names == ["fruit", "digits"] and frozen.adapters == {"fruit": "fruit", "digits": "digits"}
    assert frozen.meta["layer"] == 2 and frozen.calibration["digits"]["calibrated_on"] == "holdout"
    assert set(Router.load(dirs["naive"]).adapters.values()) == {"shared"}
    capsys.readouterr()
    queries = ["apple kiwi lemon pear fig plum mango", "314 159 265 358 979 323 846 264"]
    assert main(["route", "--run", str(dirs["frozen"]), "--json"] + queries) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["domain"] for x in lines] == ["fruit", "digits"] and lines[1]["adapter"] == "digits"
    assert main(["route", "--run", str(dirs["frozen"] / "nope"), "q"]) == 2
    assert "nope" in capsys.readouterr().err


def test_route_eval_reports_targets(runs, capsys):
    dirs, corpus = runs
    assert main(["route-eval", "--run", str(dirs["frozen"]), "--corpus", str(corpus), "--loss",
                 "--n-random", "10"]) == 0
    text = capsys.readouterr().out
    assert "targets:" in text and "latency_p50_ms" in text
    report = json.loads((dirs["frozen"] / "route_eval.json").read_text())
    routing = report["routing"]
    assert routing["accuracy_pct"] >= 90
    assert set(routing["ood"]) >= {"untrained:shout", "random_strings", "non_english"}
    assert routing["confusion"]["fruit"]["fruit"] + routing["confusion"]["fruit"][BASE] <= 10
    assert abs(report["loss"]["gap_pct"]) < 50 and report["loss"]["per_domain"]["fruit"]["n"] == 6
    assert {t["name"] for t in report["targets"]} == {"accuracy_pct", "ood_to_base_pct", "latency_p50_ms",
                                                      "routed_loss_gap_pct"}
    assert report["router"]["config"]["layer"] == 2
