"""`crma store verify --repair`: serve again what a damaged file took out, from what the store still holds.

    router     a new router version, rebuilt from the newest whole router version and, for each domain, the
               statistics recorded with its current adapter version (the router version of its registration
               or rollback). A domain whose statistics lived only in the damaged version is left out of it,
               and named: `crma add` it again (the router keeps statistics, never text).
    domain     rolled back to its newest earlier version whose files, and the backbone version it is pinned
               to, are whole; none: named, to be removed or added again.
    backbone   the newest backbone version cannot be rebuilt without training: named.

Every change goes through the writer (lock, new version folders, one manifest replace per step), so a repair
interrupted at any moment leaves the store as a writer would.
"""
from __future__ import annotations

from ..routing import Router
from .paths import StoreError, verify_files
from .store import Store
from .verify import Damage, damaged_parts


def _whole(store: Store, files: dict[str, str]) -> bool:
    try:
        verify_files(store.root, files)
    except StoreError:
        return False
    return True


def rebuilt_router(store: Store) -> tuple[Router, list[str]]:
    """(a router for the store's domains built from its whole router versions, domains it could not take)."""
    versions = sorted((int(v) for v in store.manifest["router"]["versions"]), reverse=True)
    whole = [v for v in versions if _whole(store, store.manifest["router"]["versions"][str(v)]["files"])]
    if not whole:
        raise StoreError(f"{store.root}: no router version is whole; add the domains again to build a router")
    router, lost = store.router(whole[0]), []
    domains = store.domains()
    for name in [n for n in router.names if n not in domains]:
        router.remove_domain(name)
    for domain in domains:
        source = store.adapter_meta(domain).get("router_version")
        if source in whole:
            router.take_domain(store.router(source), domain)
        elif domain in router.names and source is None:
            continue                                      # recorded before versions were: keep what is whole
        else:
            lost.append(domain)
            if domain in router.names:
                router.remove_domain(domain)
    return router, lost


def repair(root, command: str = "") -> list[str]:
    """Repair what can be repaired; returns one line per finding (what was done, or what is left to do)."""
    store = Store(root)
    damage: Damage = damaged_parts(store)
    lines = []
    if damage.router:
        with Store.writer(root, command) as w:
            router, lost = rebuilt_router(w.store)
            version = w.add_router_version(router, "repair: rebuilt from the registered statistics")
            w.log("repair", part="router", version=version, lost=lost)
            w.commit()
        lines.append(f"router: damaged ({damage.router}); rebuilt as router v{version}")
        lines += [f"router: {d}'s statistics were only in the damaged version: `crma add` it again to route to it"
                  for d in lost]
    store = Store(root)
    for domain, why in damage.domains.items():
        meta = store.adapter_meta(domain)
        versions = sorted((int(v) for v, m in store.manifest["adapters"][meta["adapter"]].items()
                           if m["domain"] == domain and int(v) < meta["version"]), reverse=True)
        target = next((v for v in versions if _domain_whole(store, domain, v)), None)
        if target is None:
            lines.append(f"{domain}: damaged ({why}); no earlier whole version: `crma store remove` it or "
                         "`crma add` it again")
            continue
        with Store.writer(root, command) as w:
            w.rollback(domain, target)
            w.commit()
        store = Store(root)
        lines.append(f"{domain}: damaged ({why}); rolled back to v{target}")
    if damage.backbone:
        lines.append(f"backbone: the newest version is damaged ({damage.backbone}); it cannot be rebuilt without "
                     "training: the base model and domains served on it stay unavailable")
    return lines


def _domain_whole(store: Store, domain: str, version: int) -> bool:
    meta = store.adapter_meta(domain, version)
    files = dict(meta["files"])
    if meta.get("backbone_version"):
        files.update(store.backbone_meta(meta["backbone_version"])["files"])
    return _whole(store, files)
