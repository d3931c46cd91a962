"""What the three Hydra commands share around their jobs: the option lists of their help pages,
a check of list-valued group choices before Hydra composes, and mandatory values that name what
to pass.

- ``${cnnft.options:GROUP,PRIMARY}`` (an OmegaConf resolver, used by ``conf/hydra/help/*.yaml``):
  the options of ``conf/GROUP/``, comma-separated, and the default ``conf/PRIMARY.yaml`` picks.
- :func:`command` wraps a ``@hydra.main`` function: ``analyses=[nosuch]`` (Hydra says only "Could
  not load 'analyses/nosuch'") exits with the available options, as ``freeze=nosuch`` does.
- :func:`require` raises a :class:`~cnnft.errors.ConfigError` naming each ``???`` value a job
  needs (``data.voc_root``, not the ``datamodule.root`` that interpolates it) and what to pass.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnft.errors import ConfigError

#: What to pass for each mandatory (``???``) value of ``conf/``.
HINTS = {
    "checkpoint": "checkpoint=PATH with a checkpoint file (e.g. outputs/pretrain/<run>/checkpoints/"
                  "last.ckpt), a directory of snapshots (outputs/pretrain/<run>/snapshots: every "
                  "*.ckpt in it), checkpoint=random (a randomly initialised network of model=), "
                  "or checkpoint=weights (model=... with its state dict in model.weights)",
    "data.imagenet_root": "data.imagenet_root=/path/to/ILSVRC2012 (train/<wnid>/*.JPEG and "
                          "val/<wnid>/*.JPEG; scale=paper has no default data)",
    "data.voc_root": "data.voc_root=/path/to/VOCdevkit/VOC2007 (Annotations/, JPEGImages/, "
                     "ImageSets/Main/; scale=paper has no default data)",
}

_REFERENCE = re.compile(r"\$\{([\w.]+)\}")


def _conf_dir() -> Path:
    from cnnft.train import CONF_DIR

    return Path(CONF_DIR)


def options(group: str) -> list[str]:
    """The options of config group ``group`` (the ``*.yaml`` files of ``conf/<group>/``)."""
    return sorted(p.stem for p in (_conf_dir() / group).glob("*.yaml"))


@functools.lru_cache(maxsize=32)
def _defaults_list(path: Path, mtime_ns: int) -> list[Any]:
    """A primary config's defaults list, read once per version of the file (the help pages'
    resolver is evaluated for every job a command composes)."""
    return OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])  # type: ignore[union-attr]


def default_choice(primary: str, group: str) -> str:
    """What ``conf/<primary>.yaml``'s defaults list picks for ``group``: an option, ``[a,b]`` for
    a list group, or ``none``."""
    path = _conf_dir() / f"{primary}.yaml"
    for entry in _defaults_list(path, path.stat().st_mtime_ns):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("optional ", "").replace("override ", "").strip() == group:
                    if isinstance(value, list):
                        return f"[{','.join(value)}]" if value else "none"
                    return "none" if value is None else str(value)
    return "none"


def group_options(group: str, primary: str | None = None) -> str:
    """``${cnnft.options:GROUP[,PRIMARY]}``: the group's options, and the default PRIMARY picks."""
    text = ", ".join(options(group))
    return f"{text} (default: {default_choice(primary, group)})" if primary else text


def role_layers(roles: Sequence[str], probe_layers: Sequence[str], unit_layer: str | None) -> str:
    """``${cnnft.role_layers:[pool5,relu7],${model.probe_layers},${model.unit_layer}}``: the
    model's layers in those paper layers' roles (``cnnft.report.paper.layer_roles``) as a list
    override value, e.g. ``[features.30,classifier.4]`` for VGG16; roles it lacks are left out."""
    from cnnft.report.paper import layer_roles

    found = layer_roles(list(probe_layers), unit_layer)
    return "[" + ",".join(found[r] for r in roles if r in found) + "]"


OmegaConf.register_new_resolver("cnnft.options", group_options, replace=True)
OmegaConf.register_new_resolver("cnnft.role_layers", role_layers, replace=True)


def check_group_choices(args: Sequence[str]) -> None:
    """Raise ConfigError for an unknown option in a list-valued group override
    (``analyses=[probe_cls,nosuch]``, also in sweeps ``[a],[b]``), listing the options. Options
    from other config directories (``--config-dir``, ``hydra.searchpath``) are Hydra's to check."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath")) for a in args):
        return
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").split("@")[0]
        if not value.lstrip().startswith("[") or not (_conf_dir() / group).is_dir():
            continue
        known = options(group)
        unknown = [t for t in re.findall(r"[^\[\],\s]+", value) if t not in known]
        if unknown:
            raise ConfigError(f"{arg}: no {group} option {', '.join(map(repr, unknown))}; available "
                              f"options in '{group}': {', '.join(known)}")


def command(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``@hydra.main`` function: check the command line's list-valued group choices first
    and exit with the message (status 1, as Hydra's own errors) instead of Hydra's bare one."""

    @functools.wraps(main)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:  # a console script: Hydra reads sys.argv
            try:
                check_group_choices(sys.argv[1:])
            except ConfigError as e:
                print(f"Error: {e}", file=sys.stderr)
                sys.exit(1)
        return main(*args, **kwargs)

    return entry


def _raw(cfg: DictConfig, key: str) -> Any:
    """The unresolved value at dotted ``key`` (a plain container for a subtree), or None."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    value = node._get_node(leaf) if isinstance(node, DictConfig) else None  # `in` skips ??? values
    if value is None:
        return None
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=False)
    return value._value()  # type: ignore[union-attr]


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(f"{key}.{i}", v)
    else:
        yield key, value


def missing_values(cfg: DictConfig, *keys: str) -> list[str]:
    """The mandatory (``???``) values that ``keys`` need: each key (or subtree) itself and,
    transitively, the keys its values interpolate (``${data.voc_root}``)."""
    found: list[str] = []
    todo, seen = list(keys), set()
    while todo:
        key = todo.pop(0)
        if key in seen:
            continue
        seen.add(key)
        for path, value in _leaves(key, _raw(cfg, key)):
            if value == "???":
                found.append(path)
            elif isinstance(value, str):
                todo += _REFERENCE.findall(value)
    return found


def require(cfg: DictConfig, *keys: str) -> None:
    """Raise ConfigError if a value that ``keys`` need is missing, saying what to pass."""
    missing = missing_values(cfg, *keys)
    if missing:
        raise ConfigError("; ".join(f"{key} is missing: pass {HINTS.get(key, key + '=VALUE')}"
                                    for key in missing))
