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
from crma.serve.auth import load_keys, match
from crma.serve.config import ServeConfig
from crma.serve.protocol import IGNORED_HEADER
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


def test_what_real_clients_send_is_accepted(store, monkeypatch):
    """The `openai` client with fields this server does not know, langchain-openai and litellm: a chat completion
    each, streamed and not; unknown fields are ignored and named in a header, output-changing ones refused."""
    monkeypatch.delenv("CRMA_API_KEY", raising=False)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")        # litellm: no download at import
    import litellm  # heavy: only for this test
    from langchain_openai import ChatOpenAI  # heavy: only for this test

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
