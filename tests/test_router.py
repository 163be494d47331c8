"""The router (issues 4 and 10): decisions from statistics only, a background class for out-of-scope text,
calibration disjoint from evaluation queries, incremental == batch, no text saved, each abstain reason,
the demo questions, and `crma route` / `crma route-eval` (crma.routing.cli) with their bad inputs.

Router-level tests use the tiny model's hidden states on synthetic domains; the end-to-end ones use the real
all-MiniLM-L6-v2 (small) on the bundled demo data."""
import copy
import json
import random
import string
from pathlib import Path

import pytest
import torch

from crma.cli import main as route_main
from crma.config import ConfigError, CRMAConfig, LoraSettings
from crma.data import DEMO_DIR, read_queries, read_records, read_texts
from crma.method.adapters import add_adapter
from crma.method.backbone import CRMABackbone
from crma.method.models import load_model
from crma.routing import calibration_split, new_router, route_texts, update_router
from crma.routing.features import hidden_features, segments_of, text_segments
from crma.routing.router import BASE, Features, Router
from crma.routing.settings import STRATEGIES, RouterConfig, RouterError

VOCAB = {   # three clearly separable synthetic domains (different byte sets for the byte tokenizer)
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum kiwi fig lime date".split(),
    "digits": [str(n) for n in (314, 159, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419, 716)],
    "shout": "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIETT KILO LIMA".split(),
}
CFG = RouterConfig(encoder="base", layer=2, min_words=4, segments_per_passage=4)
DEMO = ("cooking", "astronomy", "contracts")
FOUR = {"How long should I knead bread dough?": "cooking", "What is a red giant star?": "astronomy",
        "The lessee shall indemnify the lessor against all claims.": "contracts",
        "Who won the football match yesterday?": BASE}
CL5 = Path(__file__).resolve().parents[1] / "benchmarks" / "corpora" / "cl5"


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


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small matrices: one thread is faster and immune to a busy CPU
    yield load_model("tiny:llama", seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feats(tiny):
    """Per synthetic domain: train features (from passages), held-back features, query features."""
    model, tok = tiny
    out = {}
    for k, d in enumerate(VOCAB):
        out[d] = {"train": hidden_features(model, tok, segments_of(passages(d, 30, k), CFG), CFG.layer),
                  "hold": hidden_features(model, tok, segments_of(passages(d, 10, 100 + k), CFG), CFG.layer),
                  "query": hidden_features(model, tok, sentences(d, 20, 200 + k), CFG.layer)}
    return out


def build(feats, order, cfg=CFG) -> Router:
    router = Router(cfg)
    for d in order:
        router.add_domain(d, feats[d]["train"], feats[d]["hold"])
    return router


def demo_train(d: str, n: int = 0) -> list[str]:
    texts = read_texts(DEMO_DIR / d / "train.jsonl")
    return texts[:n] if n else texts


@pytest.fixture(scope="module")
def demo_router(tiny):
    """The default router (MiniLM, background class) built the way a store builds it, on the demo data."""
    model, tok = tiny
    router = new_router(model, meta={"model": "tiny:llama"})
    for d in DEMO:
        update_router(router, model, tok, d, d, demo_train(d), read_texts(DEMO_DIR / d / "holdout.jsonl"))
    return router


@pytest.fixture(scope="module")
def demo_folder(demo_router, tmp_path_factory):
    folder = tmp_path_factory.mktemp("router")
    demo_router.save_to(folder)
    return folder


# ---- the decision, on synthetic features ----------------------------------------------------------------
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


def test_each_abstain_reason_on_the_tiny_model(tiny, feats):
    """characters (below the noise gate), background (the out-of-scope class wins), distance (far from every
    domain, no background), empty (route_texts)."""
    model, tok = tiny
    router = build(feats, ["fruit", "digits"])
    shout = feats["shout"]["query"]
    far = router.route_batch(shout)                            # no background: too far from both domains
    assert sum(d.reason == "distance" for d in far) / len(far) >= 0.9
    assert all(d.domain == BASE and d.ood_ratio > 1 for d in far if d.reason == "distance")
    with_bg = build(feats, ["fruit", "digits"]).set_background(feats["shout"]["train"].pooled)
    bg = with_bg.route_batch(shout)                           # the same inputs: now the background class wins
    assert sum(d.reason == "background" for d in bg) / len(bg) >= 0.9
    assert all(d.background_confidence > 0.5 for d in bg if d.reason == "background")
    fruit = with_bg.route_batch(feats["fruit"]["query"])      # ... and does not take in-domain queries
    assert sum(d.domain == "fruit" for d in fruit) / len(fruit) >= 0.95
    gated = build(feats, ["fruit", "digits"]).set_noise_gate(2.0)
    x = feats["fruit"]["query"]
    noisy = gated.route_batch(Features(x.pooled, torch.full((len(x.pooled),), 1.2)))
    assert {d.reason for d in noisy} == {"characters"} and {d.domain for d in noisy} == {BASE}
    ok = gated.route_batch(Features(x.pooled, torch.full((len(x.pooled),), 3.0)))
    assert sum(d.domain == "fruit" for d in ok) >= 0.95 * len(ok)
    empty = route_texts(gated, model, tok, ["", "   "])
    assert [(d.domain, d.reason) for d in empty] == [(BASE, "empty")] * 2


def test_incremental_add_equals_building_from_scratch(feats, tmp_path):
    scratch = build(feats, list(VOCAB))
    partial = build(feats, ["fruit", "digits"])
    partial.save(tmp_path)
    grown = Router.load(tmp_path).add_domain("shout", feats["shout"]["train"], feats["shout"]["hold"])
    assert grown.names == scratch.names and grown.calibration == scratch.calibration
    assert set(grown.t) == set(scratch.t)
    for key in scratch.t:
        assert torch.equal(grown.t[key], scratch.t[key]), key
    shuffled = build(feats, ["shout", "fruit", "digits"])       # another order: same rows, same decisions
    for key in scratch.t:
        for d in VOCAB:
            assert torch.equal(shuffled.t[key][shuffled.names.index(d)], scratch.t[key][scratch.names.index(d)])
    queries = torch.cat([feats[d]["query"].pooled for d in VOCAB])
    a, b = scratch.route_batch(queries), shuffled.route_batch(queries)
    assert [x.domain for x in a] == [x.domain for x in b]
    assert all(abs(x.confidence - y.confidence) < 1e-9 for x, y in zip(a, b))


def test_merging_a_re_added_domain_pools_its_statistics(feats):
    """merge_domain(A2) after A1 == statistics of A1 and A2 together; thresholds averaged by calibration size."""
    x = feats["fruit"]["train"].pooled
    half = len(x) // 2
    merged = Router(CFG).add_domain("fruit", x[:half], feats["fruit"]["hold"]).merge_domain("fruit", x[half:])
    whole = Router(CFG).add_domain("fruit", x, feats["fruit"]["hold"])
    assert float(merged.t["count"][0]) == len(x)
    assert torch.allclose(merged.t["mean"], whole.t["mean"], atol=1e-5)
    assert torch.allclose(merged.t["cov"], whole.t["cov"], atol=1e-4)
    assert merged.calibration["fruit"]["merged"] == 2
    assert merged.calibration["fruit"]["n_calib"] == len(feats["fruit"]["hold"].pooled) + len(x) - half


def test_save_load_round_trip(feats, tmp_path):
    router = build(feats, list(VOCAB), RouterConfig(**{**vars(CFG), "strategy": "kproto"}))
    router.set_background(feats["shout"]["train"].pooled[:20]).set_noise_gate(0.5, {"rule": "test"})
    router.meta["layer"] = 2
    router.save(tmp_path)
    loaded = Router.load(tmp_path / "router")
    assert loaded.cfg == router.cfg and loaded.meta == router.meta and loaded.adapters == router.adapters
    assert loaded.noise_min == 0.5 and torch.equal(loaded.background, router.background)
    queries = torch.cat([feats[d]["query"].pooled for d in VOCAB])
    assert loaded.route_batch(queries) == router.route_batch(queries)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Router.load(tmp_path / "nowhere")
    (tmp_path / "router" / "router.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RouterError, match="not a crma router"):
        Router.load(tmp_path)


def test_settings_are_validated(feats):
    for field, value in (("strategy", "nearest"), ("quantile", 0), ("encoder", "bert"), ("background", "web"),
                         ("calib_fraction", 1.0)):
        with pytest.raises(ConfigError, match=f"router.{field}"):
            RouterConfig(**{field: value})
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


# ---- calibration never sees evaluation queries' documents ----------------------------------------------
def test_calibration_split_is_by_content_and_order_free():
    texts = [f"passage number {i} about something" for i in range(50)]
    build_a, cal_a = calibration_split(texts, 0.2)
    build_b, cal_b = calibration_split(list(reversed(texts)), 0.2)
    assert len(cal_a) == 10 and set(cal_a) == set(cal_b) and set(build_a) == set(build_b)
    assert not set(cal_a) & set(build_a)
    assert len(calibration_split(texts, 0.2, max_calib=4)[1]) == 4
    assert calibration_split(["one passage only"], 0.2) == (["one passage only"], [])


def test_calibration_passages_share_no_document_with_evaluation_queries(tiny, monkeypatch):
    """update_router calibrates on a held-back slice of the TRAIN passages; the holdout passages it is given
    (the documents evaluation queries come from) are never encoded. Fails if calibration touches them."""
    import crma.routing as routing

    model, tok = tiny
    rng = random.Random(0)
    train = [{"doc_id": f"train/{i // 2}", "text": " ".join(rng.choice(VOCAB["fruit"]) for _ in range(30)) + "."}
             for i in range(40)]
    holdout = [{"doc_id": f"hold/{i}", "text": " ".join(rng.choice(VOCAB["fruit"]) for _ in range(30)) + "."}
               for i in range(10)]
    queries = [{"doc_id": h["doc_id"], "text": h["text"].split(".")[0]} for h in holdout]
    seen = []
    real = routing.encode

    def spy(cfg, texts, *args, **kwargs):
        seen.append(list(texts))
        return real(cfg, texts, *args, **kwargs)
    monkeypatch.setattr(routing, "encode", spy)
    router = Router(RouterConfig(encoder="base", layer=2, background="none"))
    router.abstain_dims = None
    update_router(router, model, tok, "fruit", "fruit", [r["text"] for r in train], [r["text"] for r in holdout])
    assert len(seen) == 2                               # build segments, then calibration segments
    calib_segments = seen[1]
    cfg = router.cfg
    seg_doc = {s: r["doc_id"] for r in train for s in segments_of([r["text"]], cfg)}
    hold_segments = {s for r in holdout for s in segments_of([r["text"]], cfg)}
    assert calib_segments and not set(calib_segments) & hold_segments
    assert all(s in seg_doc for s in calib_segments)    # every calibration segment is from a train passage
    calib_docs = {seg_doc[s] for s in calib_segments}
    assert not calib_docs & {q["doc_id"] for q in queries}
    assert not set(calib_segments) & set(seen[0])       # held back: not in the statistics either
    assert router.calibration["fruit"]["holdout_used"] is False


@pytest.mark.parametrize("root,domains", [(DEMO_DIR, DEMO), (CL5, ("medical", "legal", "finance", "code", "science"))])
def test_corpus_calibration_slices_are_disjoint_from_query_documents(root, domains):
    """The passages update_router would calibrate on (cl5, demo data) share no doc_id with queries.jsonl."""
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    cfg = RouterConfig()
    for d in domains:
        train = records(root / d / "train.jsonl")
        _, calib = calibration_split([r["text"] for r in train], cfg.calib_fraction, cfg.max_calib)
        calib_docs = {r["doc_id"] for r in train if r["text"] in set(calib)}
        query_docs = {r["doc_id"] for r in records(root / d / "queries.jsonl")}
        assert calib_docs and not calib_docs & query_docs, d


# ---- the default router end to end (real MiniLM) --------------------------------------------------------
def test_demo_questions_route_as_a_person_expects(tiny, demo_router):
    model, tok = tiny
    decisions = route_texts(demo_router, model, tok, list(FOUR))
    assert [d.domain for d in decisions] == list(FOUR.values()), [(d.domain, d.reason) for d in decisions]
    assert decisions[3].reason == "background"
    for d in decisions[:3]:
        assert d.runner_up in DEMO and d.runner_up != d.domain and d.confidence > d.runner_up_confidence
    queries = {d: read_texts(DEMO_DIR / d / "queries.jsonl") for d in DEMO}
    correct = sum(x.domain == d for d in DEMO for x in route_texts(demo_router, model, tok, queries[d]))
    assert correct >= 27                                 # of 30 plain questions about the three domains


def test_a_conversational_domain_beside_document_domains_needs_their_example_queries(tiny, demo_router):
    """Statistics of a conversational domain come from its users' questions, a document domain's from its
    passages: a question about bread then looks more like the support desk's questions than like cooking prose.
    Example queries for the document domain (crma add --route-examples) put it back where a person expects."""
    model, tok = tiny
    support = "My espresso machine shows E1 and will not pull a shot. What should I do?"
    router = copy.deepcopy(demo_router)
    turns = [q for r in read_records(DEMO_DIR / "support" / "train.jsonl") for q in r.user_turns()]
    update_router(router, model, tok, "support", "support", turns)
    questions = [*FOUR, support]
    got = [x.domain for x in route_texts(router, model, tok, questions)]
    assert got == ["support", *list(FOUR.values())[1:], "support"]            # bread: misrouted
    update_router(router, model, tok, "cooking", "cooking", read_queries(DEMO_DIR / "cooking" / "queries.jsonl"))
    assert [x.domain for x in route_texts(router, model, tok, questions)] == [*FOUR.values(), "support"]


def test_background_class_is_present_and_used(tiny, demo_router):
    model, tok = tiny
    info = demo_router.meta["background"]
    assert info["source"].startswith("chatterbot-corpus") and info["license"] == "BSD-3-Clause"
    assert demo_router.background.shape == (info["n"], demo_router.abstain_dims)
    assert demo_router.summary()["background_components"] >= 2
    everyday = ["Who won the football match yesterday?", "Happy birthday, hope you have a lovely day!",
                "Is it going to rain tomorrow?", "I'm so tired today."]
    with_bg = route_texts(demo_router, model, tok, everyday)
    assert all(d.domain == BASE for d in with_bg), [(d.domain, d.reason) for d in with_bg]
    no_bg = Router(RouterConfig(background="none"), demo_router.dim, demo_router.meta)
    no_bg.abstain_dims = demo_router.abstain_dims
    for d in DEMO:
        no_bg.take_domain(demo_router, d)
    off = route_texts(no_bg, model, tok, everyday)
    assert sum(d.reason == "background" for d in off) == 0
    assert sum(d.domain != BASE for d in off) >= 2       # without the class most of them get an adapter


def test_character_noise_has_its_own_reason(tiny, demo_router):
    model, tok = tiny
    noise = random_strings(20, 3)
    decisions = route_texts(demo_router, model, tok, noise)
    assert all(d.domain == BASE and d.reason == "characters" for d in decisions)
    gate = demo_router.meta["noise"]
    assert gate["noise_q99"] < demo_router.noise_min < gate["text_q01"]     # set from random text vs real text


def test_incremental_update_router_equals_other_order(tiny, tmp_path):
    """A store's router after adding A then B (saved and loaded in between) equals one built B then A."""
    model, tok = tiny
    a = new_router(model)
    update_router(a, model, tok, "cooking", "cooking", demo_train("cooking", 8))
    a.save_to(tmp_path)
    a = Router.load(tmp_path)
    update_router(a, model, tok, "astronomy", "astronomy", demo_train("astronomy", 8))
    b = new_router(model)
    update_router(b, model, tok, "astronomy", "astronomy", demo_train("astronomy", 8))
    update_router(b, model, tok, "cooking", "cooking", demo_train("cooking", 8))
    for key in a.t:
        for d in ("cooking", "astronomy"):
            assert torch.allclose(a.t[key][a.names.index(d)], b.t[key][b.names.index(d)], atol=1e-6), (key, d)
    assert torch.equal(a.background, b.background) and a.noise_min == b.noise_min
    qs = list(FOUR)[:2] + ["Who won the football match yesterday?"]
    assert [(x.domain, x.reason) for x in route_texts(a, model, tok, qs)] == \
        [(x.domain, x.reason) for x in route_texts(b, model, tok, qs)]


def test_saved_router_holds_no_text(tiny, demo_router, demo_folder):
    from crma.routing.background import background_texts

    files = sorted(p.name for p in demo_folder.iterdir())
    assert files == ["router.json", "router.safetensors"]
    blob = b"".join(p.read_bytes() for p in demo_folder.iterdir())
    words = []
    for d in DEMO:
        for t in demo_train(d):
            words += [" ".join(t.split()[i : i + 4]) for i in range(0, 40, 8)]
    lines, _, _ = background_texts()
    words += [t for t in lines if len(t.split()) >= 4][:300]
    leaked = [w for w in words if w.encode() in blob]
    assert leaked == []
    info = json.loads((demo_folder / "router.json").read_text())
    assert {"format", "config", "domains", "calibration", "meta", "noise_min_chars_per_token"} <= set(info)
    assert info["meta"]["encoder"]["name"] == "minilm"


def test_router_refuses_other_features(tiny, demo_folder):
    model, tok = tiny
    router = Router.load(demo_folder)
    router.meta["encoder"] = {**router.meta["encoder"], "mix_layer": 5}
    with pytest.raises(RouterError, match="other features"):
        route_texts(router, model, tok, ["What is a red giant star?"])


# ---- crma route / crma route-eval -----------------------------------------------------------------------
def test_route_cli_prints_domain_confidence_runner_up(demo_folder, capsys):
    assert route_main(["route", "--router", str(demo_folder)] + list(FOUR)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[1] for x in lines] == list(FOUR.values())
    assert "confidence:" in lines[0] and "runner-up:" in lines[0] and "adapter: cooking" in lines[0]
    assert "abstained: closer to everyday text" in lines[3]
    assert route_main(["route", "--router", str(demo_folder), "--json", "xK9#q!zP0 a&*Lm2 @vB{}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["domain"] == BASE and out["reason"] == "characters" and out["adapter"] is None


@pytest.mark.parametrize("query", ["", "   \t "])
def test_route_cli_refuses_empty_queries(demo_folder, capsys, query):
    assert route_main(["route", "--router", str(demo_folder), "fine query", query]) == 2
    assert "query 2 is empty" in capsys.readouterr().err


def test_route_cli_unknown_store_or_router(tmp_path, capsys):
    assert route_main(["route", "--store", str(tmp_path / "nope"), "q"]) == 2
    assert "nope" in capsys.readouterr().err
    assert route_main(["route", "--router", str(tmp_path), "q"]) == 2
    assert "no router here" in capsys.readouterr().err


def test_route_eval_scores_any_labelled_set_and_ood_file(demo_folder, tmp_path, capsys):
    (tmp_path / "cook.txt").write_text("How long should I knead bread dough?\n\nHow do I stop pasta sticking?\n")
    (tmp_path / "stars.jsonl").write_text(json.dumps({"text": "What is a red giant star?"}) + "\n")
    (tmp_path / "chat.txt").write_text("Who won the football match yesterday?\nSee you tomorrow!\n")
    out = tmp_path / "report.json"
    assert route_main(["route-eval", "--router", str(demo_folder), "--queries", f"cooking={tmp_path / 'cook.txt'}",
                       "--queries", f"astronomy={tmp_path / 'stars.jsonl'}", "--ood", str(tmp_path / "chat.txt"),
                       "--n-random", "5", "--no-builtin-ood", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    overall = [x for x in text.splitlines() if x.strip().startswith("overall")]
    ood = [x for x in text.splitlines() if x.strip().startswith("ood to base")]
    assert overall and overall[0].split()[1] == "100.00%"
    assert ood and ood[0].split()[3] == "100.00%"
    report = json.loads(out.read_text())
    assert report["routing"]["n_queries"] == 3 and set(report["routing"]["ood"]) == {"random_strings", "ood:chat"}
    assert {t["name"] for t in report["targets"]} == {"accuracy_pct", "ood_to_base_pct", "latency_p50_ms"}


def test_route_eval_bad_inputs(demo_folder, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert route_main(["route-eval", "--router", str(demo_folder), "--ood", str(bad)]) == 2
    assert "latin1.txt:1: not UTF-8" in capsys.readouterr().err
    good = tmp_path / "poems.txt"
    good.write_text("Shall I compare thee to a summer's day?\n")
    assert route_main(["route-eval", "--router", str(demo_folder), "--queries", f"poetry={good}"]) == 2
    assert "'poetry' is not a domain" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert route_main(["route-eval", "--router", str(demo_folder), "--ood", str(empty)]) == 2
    assert "empty.txt: empty file (no records)" in capsys.readouterr().err
    assert route_main(["route-eval", "--router", str(demo_folder)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert route_main(["route-eval", "--store", str(tmp_path / "missing"), "--ood", str(bad)]) == 2
