"""`crma eval`: each domain's holdout loss now, beside the loss recorded when its adapter was registered.

    crma eval --store DIR --data medical=holdout.jsonl legal=...   [--backbone pinned|latest|both]

Each domain is evaluated with the sizes recorded with its adapter version (max_len, max_holdout), so on
the same holdout file the pinned loss must equal the recorded one exactly: adding domains never changes
an earlier domain's model. `latest` shows what the paper's behaviour (every adapter on the newest
backbone) would give instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..data import Record, examples_for, read_records
from ..data.domain import drop_keys
from ..store import Store, StoreError, sha256_texts
from .live import LiveModel
from .loss import mean_loss, passage_losses


@dataclass
class DomainEval:
    domain: str
    version: int
    recorded: float                      # holdout loss recorded at registration
    same_data: bool                      # the holdout given has the checksum recorded at registration
    passages: int
    loss: dict[str, float | None]        # backbone mode -> loss now (None: a file it needs is damaged)
    backbone: dict[str, int | None]      # backbone mode -> version used
    damaged: dict[str, str]              # backbone mode -> why it could not be evaluated


def holdout_records(path, domain: str, cfg: TrainConfig, meta: dict) -> list[Record]:
    """A domain's holdout records read as its adapter was registered: format, columns, the duplicates of
    training records it removed (recorded as hashes), max_holdout."""
    records = drop_keys(read_records(path, cfg.format, cfg.columns, domain),
                        meta["data"]["holdout"].get("duplicates_removed", []))
    return records[: cfg.max_holdout] if cfg.max_holdout else records


def evaluate_store(live: LiveModel, data: dict[str, str], modes: tuple[str, ...] = ("pinned", "latest"),
                   progress: bool = True) -> list[DomainEval]:
    """Loss of each named domain of the store `live` was opened from, on its holdout file, under each backbone
    mode. A damaged file (adapter or backbone version) is reported in that row; the other rows are evaluated."""
    store = live.store
    out = []
    for domain, path in data.items():
        meta = store.adapter_meta(domain)
        cfg = TrainConfig.recorded(meta["train"])
        records = holdout_records(path, domain, cfg, meta)
        ids = examples_for(records, live.tokenizer, cfg)[0]
        if not ids:
            raise StoreError(f"{path}: no holdout examples for {domain}")
        same = sha256_texts([r.canonical() for r in records]) == meta["data"]["holdout"]["sha256"]
        losses, versions, damaged = {}, {}, {}
        for mode in modes:
            versions[mode] = store.backbone_version(domain, mode)
            try:
                with live.using(domain, mode) as model:
                    losses[mode] = mean_loss(passage_losses(model, ids, cfg.eval_batch_size,
                                                            live.tokenizer.pad_token_id,
                                                            desc=f"eval {domain} ({mode})", progress=progress))
            except StoreError as err:                    # a damaged or missing file: this cell only
                losses[mode], damaged[mode] = None, str(err).replace(f"{store.root}/", "")
        out.append(DomainEval(domain, meta["version"], meta["holdout_loss"], same, len(records), losses, versions,
                              damaged))
    return out


def _pct(now: float, recorded: float) -> float:
    """100 (now - recorded) / recorded to 2 decimals; a change that rounds to zero is +0.00, not -0.00."""
    return round(100 * (now - recorded) / recorded, 2) + 0.0


def format_eval(rows: list[DomainEval], store: Store) -> str:
    modes = list(rows[0].loss) if rows else []
    head = f"{'domain':<14}{'adapter':>8}{'recorded':>10}" + "".join(f"{m:>10}{'change':>9}{'bb':>5}"
                                                                     for m in modes) + "  data"
    lines = [f"crma eval: {store.root} ({store.condition}, {store.model_spec})", head]
    for r in rows:
        cells = "".join((f"{r.loss[m]:>10.4f}{_pct(r.loss[m], r.recorded):>+8.2f}%"
                         if r.loss[m] is not None else f"{'damaged':>10}{'-':>9}")
                        + f"{('v' + str(r.backbone[m])) if r.backbone[m] else '-':>5}" for m in modes)
        lines.append(f"{r.domain:<14}{'v' + str(r.version):>8}{r.recorded:>10.4f}{cells}  "
                     + ("same as registered" if r.same_data else "OTHER data than registered"))
        lines += [f"  {r.domain} ({m}) could not be evaluated: {why}" for m, why in r.damaged.items()]
    lines.append("change = loss now vs the loss recorded at registration (positive = worse); "
                 "bb = backbone version used")
    return "\n".join(lines)
