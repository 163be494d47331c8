"""Who may use the server and what it tells its operator: API keys (401/403 as the `openai` client sees them,
`auto` routing among a key's domains), Prometheus /metrics counting what was sent, the routing log and
`crma route-log`, and the start-up messages about open access."""
from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crma.cli import main
from crma.cli.serve import access_warnings
from crma.config import ConfigError
from crma.data import Example, text_ids
from crma.engine.live import LiveModel
from crma.engine.loss import passage_losses
from crma.serve.auth import load_keys, match
from crma.serve.config import ServeConfig
from crma.serve.protocol import IGNORED_HEADER
from crma.store import Store
from tests.conftest import write_cycle_domain
from tests.test_serve import TRAIN, client, serving

ALL, UP = "sk-all-0123456789", "sk-up-0123456789"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny:llama store with two domains, up (abcd...) and down (dcba...)."""
    root = tmp_path_factory.mktemp("access")
    for k, (name, cycle) in enumerate({"up": "abcd", "down": "dcba"}.items()):
        write_cycle_domain(root / f"{name}.jsonl", cycle, 24, 300 + k)
        write_cycle_domain(root / f"{name}_hold.jsonl", cycle, 6, 400 + k)
        assert main(["add", "--store", str(root / "s"), "--domain", name, "--data",
                     f"{root / name}.jsonl:{root / name}_hold.jsonl", *TRAIN]) == 0
    return root / "s"


def chat(url: str, key: str, model: str, text: str = "abcdabcd", **kw):
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=4,
                                     temperature=0, **kw)


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_keys_metrics_and_the_routing_log_on_a_live_server(store, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    log = tmp_path / "route.log"
    with serving(store, api_key=[ALL, f"{UP}=up"], route_log=log) as (url, server):
        bare = httpx.post(url + "/v1/chat/completions", json={"model": "up", "messages": [
            {"role": "user", "content": "abcd"}]})                                 # no key at all
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert bare.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key") as err:
            chat(url, "sk-wrong-0123456789", "up")
        assert err.value.status_code == 401
        with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'down'") as err:
            chat(url, UP, "down")
        assert err.value.status_code == 403
        assert chat(url, ALL, "down").crma["domain"] == "down"
        assert chat(url, UP, "up").crma["domain"] == "up"
        downish = ("dcba" * 15)[1:57]                                          # a passage of down
        assert chat(url, ALL, "auto", downish).crma["domain"] == "down"          # the full router: down
        assert chat(url, UP, "auto", downish).crma["domain"] in ("up", "base")   # the key's router: never down
        listed = client(url).with_options(api_key=UP).models.list()
        assert sorted(m.id for m in listed.data) == ["auto", "base", "up"]
        stream = chat(url, ALL, "up", stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) is not None

        assert httpx.get(url + "/metrics").status_code == 401
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {UP}"}).text
        assert metric(text, "crma_requests_total", model="up", domain="up", status="200") == 2   # 1 + 1 streamed
        assert metric(text, "crma_requests_total", model="down", domain="down", status="200") == 1
        assert metric(text, "crma_requests_total", model="down", domain="-", status="403") == 1
        assert metric(text, "crma_requests_total", model="-", domain="-", status="401") == 2
        assert metric(text, "crma_router_decisions_total", domain="down", reason="chosen") == 1
        assert metric(text, "crma_generated_tokens_total") == sum(
            json.loads(line)["completion_tokens"] for line in log.read_text().splitlines())
        assert metric(text, "crma_time_to_first_token_seconds_count") == 5
        assert metric(text, "crma_queue_depth") == 0 and metric(text, "crma_manifest_updated_timestamp_seconds") > 0

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 5 and {ln["status"] for ln in lines} == {"200"}
    keys = {ln["key"] for ln in lines}
    assert len(keys) == 2 and all(len(k) == 12 and k not in (ALL, UP) for k in keys)
    assert all("prompt" not in ln and "answer" not in ln for ln in lines)           # no text without --log-text
    assert {"time", "model", "domain", "confidence", "runner_up", "adapter_version", "backbone_version",
            "prompt_tokens", "completion_tokens", "ttft_s", "total_s"} <= set(lines[0])
    capsys.readouterr()
    assert main(["route-log", str(log), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 5 and summary["auto"] == 2 and summary["served"]["up"]["requests"] >= 2
    assert main(["route-log", str(tmp_path / "none.log")]) == 2


def test_metrics_token_and_log_text(store, tmp_path, monkeypatch):
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    log = tmp_path / "route.log"
    with serving(store, metrics_token="m3trics-token", route_log=log, log_text=True) as (url, _):
        assert chat(url, "anything", "up", "abcd").crma["domain"] == "up"           # no keys: /v1 is open
        assert httpx.get(url + "/metrics").status_code == 401
        ok = httpx.get(url + "/metrics", headers={"Authorization": "Bearer m3trics-token"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["prompt"] == "abcd" and isinstance(line["answer"], str) and line["key"] is None


def test_keys_from_a_file_and_the_environment(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# ops\n{ALL}\n{UP} up,down   # two domains\n")
    os.chmod(f, 0o600)
    keys = load_keys([], f, environ={"CRMA_API_KEY": "sk-env-0123456789=up"})
    assert [k.domains for k in keys] == [None, frozenset({"up", "down"}), frozenset({"up"})]
    assert match(keys, f"Bearer {UP}") is keys[1] and match(keys, "Bearer nope") is None and match(keys, None) is None
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_keys([], f, environ={})
    for bad, why in ((["short"], "at least 8"), ([ALL, ALL], "twice"), ([f"{ALL}=Bad/Name"], "domain")):
        with pytest.raises(ConfigError, match=why):
            load_keys(bad, None, environ={})


def test_start_up_says_who_can_use_the_server():
    loop = ServeConfig(store="s")
    assert "no API keys: /v1 is open to every user of this machine" in access_warnings(loop, 0)[0]
    wide = ServeConfig(store="s", host="0.0.0.0")
    assert access_warnings(wide, 0)[0].startswith("warning: no API keys and listening on 0.0.0.0")
    assert access_warnings(wide, 2) == ["2 API key(s): /v1 and /metrics need one"]


def test_unknown_fields_are_ignored_and_output_changing_ones_refused(store, monkeypatch):
    """Through the `openai` client: fields this server does not know are ignored and named in a header;
    parameters of other servers that would change the output are refused with a 400 naming them."""
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    with serving(store) as (url, _):
        raw = client(url).chat.completions.with_raw_response.create(
            model="up", messages=[{"role": "user", "content": "abcd"}], max_tokens=3, temperature=0,
            extra_body={"store": False, "metadata": {"team": "x"}, "service_tier": "auto", "top_k": -1})
        assert raw.headers[IGNORED_HEADER] == "store, metadata, service_tier, top_k"
        assert raw.parse().crma["domain"] == "up"
        with pytest.raises(openai.BadRequestError, match="'min_p' is not supported") as err:
            chat(url, "x" * 8, "up", extra_body={"min_p": 0.1})
        assert err.value.body["param"] == "min_p"
        with pytest.raises(openai.BadRequestError, match="messages.0.tool_calls"):
            client(url).chat.completions.create(model="up", max_tokens=2, messages=[
                {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {
                    "name": "f", "arguments": "{}"}}]}, {"role": "user", "content": "x"}])


@pytest.mark.slow
def test_langchain_and_litellm_chat_streamed_and_not(store, monkeypatch):
    """langchain-openai's ChatOpenAI and litellm (slow: importing them takes most of the time) against a live
    server: the same greedy answer whole and streamed, and from both clients."""
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")        # litellm: no download at import
    import litellm  # heavy: only for this test
    from langchain_openai import ChatOpenAI  # heavy: only for this test

    with serving(store) as (url, _):
        lc = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="up", max_tokens=4, temperature=0,
                        max_retries=0)
        whole = lc.invoke("abcdabcd")
        assert isinstance(whole.content, str) and whole.response_metadata["model_name"] == "up"
        streamed = "".join(chunk.content for chunk in lc.stream("abcdabcd"))
        assert streamed == whole.content

        kw = dict(model="openai/up", api_base=url + "/v1", api_key="unused", max_tokens=4, temperature=0,
                  messages=[{"role": "user", "content": "abcdabcd"}])
        lite = litellm.completion(**kw)
        assert lite.choices[0].message.content == whole.content
        pieces = [c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kw)]
        assert "".join(pieces) == whole.content


def test_logprobs_echo_and_prompt_lists_as_openai_shapes_them(store, monkeypatch):
    """Echoed prompt log-probabilities equal what `crma eval` computes for the same tokens with the same adapter;
    greedy chat tokens carry their log-probability (the top alternative's), streamed and not; several prompts
    give one choice each, equal to asking one at a time."""
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    live = LiveModel.open(Store(store))
    ids = text_ids(live.tokenizer, "abcdabcdab")
    with live.using("up") as model:
        loss_sum, n = passage_losses(model, [Example(ids, ((0, len(ids)),))], 8, live.tokenizer.pad_token_id,
                                     progress=False)[0]
    with serving(store) as (url, _):
        c = client(url)
        scored = c.completions.create(model="up", prompt="abcdabcdab", max_tokens=0, echo=True, logprobs=2)
        lp = scored.choices[0].logprobs
        assert scored.choices[0].text == "abcdabcdab" and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
        assert sum(lp.token_logprobs[1:]) == pytest.approx(-loss_sum, rel=1e-4, abs=1e-3) and n == len(ids) - 1
        assert all(len(t) == 2 and max(t.values()) >= v - 1e-9 for t, v in zip(lp.top_logprobs[1:],
                                                                              lp.token_logprobs[1:]))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]

        kw = dict(model="up", messages=[{"role": "user", "content": "abcd"}], max_tokens=5, temperature=0,
                  logprobs=True, top_logprobs=3)
        whole = c.chat.completions.create(**kw)
        content = whole.choices[0].logprobs.content
        assert "".join(t.token for t in content) == whole.choices[0].message.content
        for t in content:                                  # greedy: the chosen token is the most likely one
            assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
            assert t.bytes == list(t.token.encode("utf-8"))
        streamed = [e for ch in c.chat.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content]
        assert [(e.token, round(e.logprob, 6)) for e in streamed] == [(e.token, round(e.logprob, 6)) for e in content]

        both = c.completions.create(model="auto", prompt=["abcdabcd", "dcbadcba"], max_tokens=4, temperature=0)
        assert [ch.index for ch in both.choices] == [0, 1]
        for ch, p in zip(both.choices, ["abcdabcd", "dcbadcba"]):
            assert ch.text == c.completions.create(model="auto", prompt=p, max_tokens=4, temperature=0).choices[0].text


@pytest.mark.slow
def test_lm_evaluation_harness_scores_a_local_task_against_crma_serve(store, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model (echo + logprobs, batched token-id prompts) on a
    multiple-choice task over a local file: the adapter that learned the a->b->c->d cycle picks its
    continuations."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager  # heavy: only for this test

    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    rows = []
    for k in range(8):
        context = ("abcd" * 8)[k % 4:][:20]
        right = "".join("abcd"[("abcd".index(context[-1]) + 1 + j) % 4] for j in range(6))
        choices = [right, "dddddd", "cacaca"]
        rows.append({"context": context, "choices": choices, "answer": 0})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "crma_cycle.yaml").write_text(
        "task: crma_cycle\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    tok_dir = tmp_path / "tokenizer"
    LiveModel.open(Store(store)).tokenizer.save_pretrained(tok_dir)
    with serving(store) as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["crma_cycle"], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args=f"model=up,base_url={url}/v1/completions,tokenizer={tok_dir},tokenizer_backend=huggingface,"
                       "num_concurrent=1,max_retries=1,batch_size=4")
    acc = out["results"]["crma_cycle"]["acc,none"]
    assert acc >= 0.75, out["results"]


def test_an_oversize_body_is_a_413_the_openai_client_reads_every_time(store, monkeypatch):
    """Refused from Content-Length (the openai client sends one) and while reading a chunked body: the client
    gets the status and the message, 10 times out of 10, and the server goes on."""
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    with serving(store, max_body_bytes=64 << 10) as (url, _):
        c = client(url)
        for _ in range(10):
            with pytest.raises(openai.APIStatusError, match="exceeds the limit") as err:
                c.completions.create(model="up", prompt="a" * (100 << 10), max_tokens=1)
            assert err.value.status_code == 413

        def chunked():
            for _ in range(4):
                yield b'{"model": "up", "prompt": "' + b"a" * (30 << 10)
        for _ in range(10):
            r = httpx.post(url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
        assert chat(url, "unused-key", "up").choices[0].finish_reason in ("stop", "length")
