"""One damaged file takes out only what needs it: at server start, at reload, in `crma eval` and `crma store
show`; `crma store verify --repair` serves again what the store still holds. On copies of a small store kept
in tests/fixtures (tiny:llama, modular: cooking pinned to backbone v1, astronomy to v2, router v2)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from crma.cli import main
from crma.data import DEMO_DIR
from crma.store import Store
from crma.store.verify import damaged_parts
from tests.test_serve import client, serving

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0"
QUESTION = "How long should I knead bread dough?"


def flip(path: Path) -> None:
    """Change one byte in the middle of a file (what a bad disk or a careless edit does)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(FIXTURE, root)
    return root


def holdout_args() -> list[str]:
    return [f"{d}={DEMO_DIR / d / 'holdout.jsonl'}" for d in ("cooking", "astronomy")]


@pytest.mark.parametrize("part", ["adapter", "pinned-backbone"])
def test_a_damaged_domain_is_unavailable_and_the_rest_serves(store, part, capsys):
    flip(store / ("adapters/cooking/v1/adapter_model.safetensors" if part == "adapter"
                  else "backbone/v1/crma_backbone.safetensors"))
    damage = damaged_parts(Store(store))
    assert list(damage.domains) == ["cooking"] and not damage.router and not damage.backbone
    with serving(store) as (url, server):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["astronomy", "auto", "base"]
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="cooking", prompt="abc", max_tokens=2, temperature=0)
        assert err.value.status_code == 503 and "crma store verify" in err.value.message
        for model in ("astronomy", "base"):
            assert c.completions.create(model=model, prompt="abc", max_tokens=3, temperature=0).choices[0].text
        health = server.health()
        assert health["status"] == "degraded" and list(health["unavailable"]) == ["cooking"]
        assert ("adapters/cooking/v1" if part == "adapter" else "backbone/v1") in health["unavailable"]["cooking"]
    # crma eval goes on past the damaged domain, and says why; crma store show lists it
    assert main(["eval", "--store", str(store), "--data", *holdout_args()]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cooking ", "astronomy "))}
    assert "damaged" in rows["cooking"] and rows["astronomy"].split()[3] == "5.2682"
    assert "cooking (pinned) could not be evaluated" in out
    assert main(["store", "show", str(store)]) == 0
    assert "UNAVAILABLE cooking" in capsys.readouterr().out


def test_a_damaged_router_is_rebuilt_from_the_registered_statistics(store, capsys):
    assert main(["store", "remove", str(store), "astronomy"]) == 0        # router v3: cooking's stats copied
    flip(store / "router" / "v3" / "router.safetensors")
    with serving(store) as (url, server):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["cooking", "base"]           # auto cannot route
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="auto", prompt=QUESTION, max_tokens=2, temperature=0)
        assert err.value.status_code == 503
        assert c.completions.create(model="cooking", prompt="abc", max_tokens=2, temperature=0).choices[0].text
        assert main(["store", "verify", str(store)]) == 1
        assert "damaged: router (auto)" in capsys.readouterr().out
        assert main(["store", "verify", str(store), "--repair"]) == 0
        assert "rebuilt as router v4" in capsys.readouterr().out
        assert server.reload()["status"] == "reloaded"
        r = c.completions.create(model="auto", prompt=QUESTION, max_tokens=2, temperature=0)
        assert r.crma["domain"] == "cooking"
        assert server.health()["status"] == "ok"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["router"]["current"] == 4 and manifest["log"][-1]["op"] == "repair"
    Store(store).verify()


def test_a_damaged_old_file_does_not_block_a_hot_add(store):
    """The server keeps serving, and takes a new domain, while one old file is damaged."""
    with serving(store, admin_token="t0ken") as (url, server):
        flip(store / "adapters" / "cooking" / "v1" / "adapter_model.safetensors")
        data = DEMO_DIR / "contracts"
        assert main(["add", "--store", str(store), "--domain", "contracts", "--data",
                     f"{data / 'train.jsonl'}:{data / 'holdout.jsonl'}", "--max-len", "48", "--epochs", "1",
                     "--lr", "1e-2"]) == 0
        reply = httpx.post(url + "/admin/reload", headers={"Authorization": "Bearer t0ken"}, timeout=60)
        assert reply.status_code == 200, reply.text
        models = [m.id for m in client(url).models.list().data]
        assert "contracts" in models and "cooking" not in models and "astronomy" in models
        assert client(url).completions.create(model="contracts", prompt="The lessee", max_tokens=2,
                                              temperature=0).choices[0].text
