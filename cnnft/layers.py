"""``cnnft-layers``: a model's tappable layers, in execution order, with their output shapes.

``cnnft-layers model=resnet50`` (at the demo's input size), ``... scale=paper`` (the model's own
input size), ``model=torchvision model.name=<any torchvision classifier>``, or
``model=custom model._target_=my.module.Net``. Layers marked ``*`` are the analyses' defaults
(``model.probe_layers``); ``u`` the unit analyses' layer, ``f`` Figure 5's filters. A layer that
runs more than once per forward pass (a shared ReLU) cannot be tapped: its calls column says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cnnft.cli import command
from cnnft.models.build import build_network, model_label
from cnnft.models.tapped import layer_table
from cnnft.train import CONF_DIR


def format_layers(model: Mapping[str, Any]) -> str:
    """The listing ``cnnft-layers`` prints for a resolved ``model`` node."""
    torch.manual_seed(0)
    net = build_network(model, load_weights=False)
    marks = {}
    for key, mark in (("probe_layers", "*"), ("unit_layer", "u"), ("first_conv", "f")):
        value = model.get(key)
        for name in (value if isinstance(value, list) else [value] if value not in (None, "???") else []):
            marks[name] = marks.get(name, "") + mark
    rows = layer_table(net)
    width = max(len(str(r["name"])) for r in rows)
    lines = [f"{model_label(model)}: {len(rows)} layers at input {model['input_size']}x"
             f"{model['input_size']} (* probe_layers, u unit_layer, f first_conv)",
             f"    {'layer':<{width}}  {'type':<22} output shape"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] is not None else "(not a tensor)"
        calls = "" if r["calls"] == 1 else f"   runs {r['calls']}x per pass: not tappable"
        lines.append(f"{marks.get(r['name'], ''):>3} {r['name']:<{width}}  {r['type']:<22} {shape}{calls}")
    return "\n".join(lines)


@command
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="layers")
def main(cfg: DictConfig) -> None:
    # unset (???) keys come through as "???": model=torchvision without model.name then lists
    # the valid names, and unset probe_layers mark nothing
    print(format_layers(OmegaConf.to_container(cfg.model, resolve=True)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
