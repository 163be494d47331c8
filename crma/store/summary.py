"""A store as one plain dictionary: what `crma store show --json` prints and the web console draws.

    describe(Store("models/clinic"))
    {"condition": "modular", "model": {...}, "backbone": {"current": 3, "versions": [...]},
     "router": {...}, "domains": [{"name": "medical", "current": 2, "versions": [...]}, ...],
     "log": [{"time": ..., "op": "add", "domain": "medical", "version": 1, "backbone_version": 1}, ...]}

Every adapter version carries what it was registered with: the backbone version it is pinned to, the
router version, its data counts and checksums, its holdout loss, the base model's and the gain, and its
task scores when it was added with --tasks. No file system paths and no command lines: the dictionary
can be shown to whoever may use the store.
"""
from __future__ import annotations

from .store import Store
from .verify import damaged_parts

DATA_FIELDS = ("passages", "tokens", "sha256")


def _data(meta: dict) -> dict:
    out = {}
    for side, rec in (meta.get("data") or {}).items():
        stats = rec.get("stats") or {}
        out[side] = {**{k: rec.get(k) for k in DATA_FIELDS}, "records": stats.get("records"),
                     "examples": stats.get("examples"), "tokens_trained": stats.get("tokens_trained")}
    return out


def _tasks(meta: dict) -> dict | None:
    t = meta.get("tasks")
    if not t:
        return None
    return {k: t.get(k) for k in ("name", "items", "sha256", "score", "base_score", "min_task_score")}


def _version(meta: dict, version: int) -> dict:
    return {"version": version, "created": meta.get("created"), "backbone_version": meta.get("backbone_version"),
            "router_version": meta.get("router_version"), "base_loss": meta.get("base_loss"),
            "holdout_loss": meta.get("holdout_loss"), "gain_pct": meta.get("gain_pct"), "steps": meta.get("steps"),
            "train_seconds": meta.get("train_seconds"), "data": _data(meta), "tasks": _tasks(meta),
            "files": {rel.split("/")[-1]: sha for rel, sha in meta.get("files", {}).items()}}


def describe(store: Store, damage=None) -> dict:
    """The store's manifest as the dictionary above; `damage` (damaged_parts) marks what cannot be served."""
    m = store.manifest
    damage = damaged_parts(store) if damage is None else damage
    domains = []
    for name, entry in m["domains"].items():
        versions = m["adapters"][entry["adapter"]]
        own = sorted(int(v) for v, meta in versions.items() if meta["domain"] == name or entry["adapter"] != name)
        domains.append({"name": name, "status": entry["status"], "adapter": entry["adapter"],
                        "current": entry["current"], "added": entry.get("added"),
                        "unavailable": damage.domains.get(name),
                        "versions": [_version(versions[str(v)], v) for v in own]})
    bb, rt = m["backbone"], m["router"]
    return {
        "condition": m["condition"], "crma_version": m.get("crma_version"), "created": m.get("created"),
        "updated": m.get("updated"),
        "model": {"spec": m["model"]["spec"], "architecture": m["model"]["fingerprint"].get("architecture"),
                  "fingerprint": m["model"]["fingerprint"].get("weights_bf16_sha256")},
        "backbone": {"current": bb["current"], "unavailable": damage.backbone, "versions": [
            {"version": int(v), "created": e.get("created"), "parent": e.get("parent"),
             "trained_on": e.get("trained_on"), "phase": e.get("phase"),
             "files": {rel.split("/")[-1]: sha for rel, sha in e.get("files", {}).items()}}
            for v, e in sorted(bb["versions"].items(), key=lambda kv: int(kv[0]))]},
        "router": {"current": rt["current"], "unavailable": damage.router, "versions": [
            {"version": int(v), "created": e.get("created"), "reason": e.get("reason"), "domains": e.get("domains")}
            for v, e in sorted(rt["versions"].items(), key=lambda kv: int(kv[0]))]},
        "domains": domains,
        "log": [{**{k: v for k, v in e.items() if k != "command"}, "router_version": _router_of(e, m)}
                for e in m.get("log", [])],
    }


def _router_of(event: dict, m: dict) -> int | None:
    """The router version a logged change wrote: recorded in the entry (stores since crma 0.1.0's console),
    else, for older stores, the adapter version's router version (an add) or the newest router version
    with the change's reason made by then (a rollback, a remove)."""
    if "router_version" in event:
        return event["router_version"]
    domain, op = event.get("domain"), event.get("op")
    if op == "add" and domain in m["domains"]:
        meta = m["adapters"].get(m["domains"][domain]["adapter"], {}).get(str(event.get("version")), {})
        return meta.get("router_version")
    reason = {"rollback": f"rollback {domain} to v{event.get('version')}", "remove": f"remove {domain}"}.get(op)
    made = [int(v) for v, e in m["router"]["versions"].items()
            if e.get("reason") == reason and (e.get("created") or "") <= (event.get("time") or "")]
    return max(made) if made else None
