"""The paper's published numbers (``cnnft/paper/tables.json``, shipped with the package) and
the names that connect them to ours: layers, networks, classes, iterations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

#: Our probe layers in order, and the paper's names for them (Tables 1-3 vs. 4 and 7).
LAYERS = ("pool1", "pool2", "relu3", "relu4", "pool5", "relu6", "relu7")
PAPER_LAYER = {"pool1": "pool-1", "pool2": "pool-2", "relu3": "relu-3", "relu4": "relu-4",
               "pool5": "pool-5", "relu6": "relu-6", "relu7": "relu-7"}
PAPER_LAYER_CONV = {**PAPER_LAYER, "relu3": "conv-3", "relu4": "conv-4"}


def layer_roles(probe_layers: Sequence[str] | None, unit_layer: str | None = None) -> dict[str, str]:
    """Which of a model's layers plays each paper layer's role in the tables (paper layer ->
    model layer), so that one report layout serves any network. CaffeNet: its own names. Seven
    probe layers: in order (pool1 ... relu7; e.g. VGG16's five pooled blocks and two fc layers).
    Otherwise only two roles: pool5 is ``unit_layer`` (the last convolutional block) and relu7
    the last probe layer when it comes after it (the representation the classifier reads)."""
    if not probe_layers or list(probe_layers) == list(LAYERS):
        return {layer: layer for layer in LAYERS}
    layers = list(probe_layers)
    if len(layers) == len(LAYERS):
        return dict(zip(LAYERS, layers))
    roles = {}
    if unit_layer:
        roles["pool5"] = unit_layer
    if unit_layer in layers and layers.index(unit_layer) < len(layers) - 1:
        roles["relu7"] = layers[-1]
    return roles


#: Our network names and the paper's.
NETWORKS = ("pretrained", "finetune_all", "finetune_fc", "fifty_fifty", "random", "control")
NETWORK_TITLE = {"pretrained": "alex-net", "finetune_all": "all-tune (FT)", "finetune_fc": "fc-tune",
                 "fifty_fifty": "50-50", "random": "random init",
                 "control": "low-level control"}
#: Names a run directory may carry for each network (``cnnft-report DIR``).
NETWORK_ALIASES = {
    "pretrained": ("pretrained", "pretrain", "alexnet", "alex-net", "an"),
    "finetune_all": ("finetune_all", "all", "all_tune", "all-tune", "finetuned", "ft", "finetune"),
    "finetune_fc": ("finetune_fc", "fc", "fc_tune", "fc-tune", "fc-ft"),
    "fifty_fifty": ("fifty_fifty", "50-50", "50_50"),
    "random": ("random",),
    "control": ("control", "lowlevel", "lowlevel_control"),
}

#: The paper's short class names (table headers).
CLASS_SHORT = {"aeroplane": "aero", "bicycle": "bike", "bird": "bird", "boat": "boat", "bottle": "bottle",
               "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
               "diningtable": "table", "dog": "dog", "horse": "horse", "motorbike": "mbike",
               "person": "person", "pottedplant": "plant", "sheep": "sheep", "sofa": "sofa",
               "train": "train", "tvmonitor": "tv"}

#: The paper's pretraining length (iterations); Table 7's columns are scaled from it.
PAPER_PRETRAIN_ITERATIONS = 310_000


@cache
def paper_tables() -> dict[str, Any]:
    """``tables.json``: every number of the draft's Tables 1-8 (percent; null = not given)."""
    return json.loads(resources.files("cnnft").joinpath("paper/tables.json").read_text())


def network_of(name: str) -> str | None:
    """Our network name for a directory or column name (``fc-tune`` -> ``finetune_fc``)."""
    low = name.lower()
    return next((net for net, names in NETWORK_ALIASES.items() if low in names), None)


def iteration_of(label: str) -> int:
    """``"15K"`` -> 15000."""
    label = label.strip().upper()
    return int(float(label[:-1]) * 1000) if label.endswith("K") else int(label)
