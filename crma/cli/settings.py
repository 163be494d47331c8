"""The settings sections shared by several commands: each a config dataclass under its option prefix.

    train   TrainConfig     --epochs, --lr, --batch-size, --max-len, ...
    lora    LoraSettings    --lora-r, --lora-alpha, ...
    crma    CRMAConfig      --crma-n-streams, --crma-rho, ...
    cl      CLConfig        --cl-ewc-lambda, ... (the baselines)
    device  DeviceConfig    --device, --dtype, --gradient-checkpointing, --load-in-4bit, --fsdp
    router  RouterConfig    --router-encoder, --router-strategy, ...
    task    TaskConfig      --task-max-new-tokens, --task-batch-size (scoring task items)
"""
from __future__ import annotations

import argparse

from ..config import CLConfig, CRMAConfig, DeviceConfig, LoraSettings, TaskConfig, TrainConfig
from ..routing import RouterConfig
from .options import add_options, build

SECTIONS = {"train": (TrainConfig, ""), "lora": (LoraSettings, "lora-"), "crma": (CRMAConfig, "crma-"),
            "cl": (CLConfig, "cl-"), "device": (DeviceConfig, ""), "router": (RouterConfig, "router-"),
            "task": (TaskConfig, "task-")}


def add_sections(parser: argparse.ArgumentParser, names: tuple[str, ...], defaults: dict | None = None,
                 hidden: tuple[str, ...] = ()) -> None:
    """The options of each named section (defaults from `defaults[name]` where given)."""
    for name in names:
        cls, prefix = SECTIONS[name]
        add_options(parser, cls, prefix, name, (defaults or {}).get(name), hidden)


def sections(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """{section name: its config} from the parsed options."""
    return {name: build(args, SECTIONS[name][0], name) for name in names}
