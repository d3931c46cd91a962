"""What ``cnnft-reproduce`` keeps between calls: done markers keyed by content, weights digests,
failure records and the call history in ``<root>/reproduce.json``.

Markers hold nothing that depends on where the root lives, so a moved, copied or re-spelled root is
recognised: paths under the root are written ``<root>/...`` (:func:`unrooted`); an analysis marker
is keyed by the weights digest of its checkpoint (:class:`Digests`) and a hash of its resolved
config without the keys in :data:`UNKEYED` (:func:`config_key`). Markers written before they were
keyed by content (a file ``stamp``) are adopted when their file is unchanged (:func:`adopt`).
"""

from __future__ import annotations

import json
import logging
import os
import traceback
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cnnft.checkpoint import model_state, read_checkpoint
from cnnft.errors import CheckpointError
from cnnft.hashing import file_digest, files_fingerprint, model_digest, stable_hash
from cnnft.io import write_json
from cnnft.models.build import model_label
from cnnft.train import CONF_DIR

log = logging.getLogger(__name__)

MARKERS = ".done"
FAILURES = ".failed"
#: Config keys left out of an analysis marker's key: the checkpoint path and the output
#: directory (where the root lives; the checkpoint counts by its weights digest) and what
#: changes how a job runs, not what it computes.
UNKEYED = ("checkpoint", "paths.output_dir", "run_name", "run_group", "job_num", "tags", "progress", "logger",
           "data.num_workers")
ROOT = "<root>"
#: Keys that came later with the value every job had before them (the ``model`` config group's
#: CaffeNet keys): left out of the key while they hold that value, so that what was finished
#: before they existed stays finished.
INTRODUCED: dict[str, Any] = {
    "model.family": "caffenet", "model.name": "caffenet", "model.input_std": None,
    "model.weights": None, "model.first_conv": "conv1", "model.unit_layer": "pool5",
    "model.probe_layers": ["pool1", "pool2", "relu3", "relu4", "pool5", "relu6", "relu7"],
    "model.conv_layers": ["conv1", "conv2", "conv3", "conv4", "conv5"], "model.fc_layers": ["fc6", "fc7"],
    "freeze.upto": None,
}


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed launch (SLURM, torchrun)."""
    return all(int(os.environ.get(v, 0)) == 0 for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


# ---------------------------------------------------------------- markers


def marker_path(directory: Path, unit: str) -> Path:
    return directory / MARKERS / f"{unit}.json"


def read_marker(directory: Path, unit: str) -> dict[str, Any] | None:
    path = marker_path(directory, unit)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(directory: Path, unit: str, **info: Any) -> None:
    """Record that ``unit`` finished in ``directory`` (atomically); clear an old failure record."""
    if is_rank_zero():
        write_json(marker_path(directory, unit), {"unit": unit, "finished": now(), **info})
        (directory / FAILURES / f"{unit}.json").unlink(missing_ok=True)


def write_failure(directory: Path, unit: str, error: BaseException) -> None:
    if is_rank_zero():
        write_json(directory / FAILURES / f"{unit}.json",
                   {"unit": unit, "failed": now(), "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exception(error)})


def file_stamp(path: str | Path) -> str:
    """The file stamp (path as given, size, mtime) that markers held before they were keyed by
    content; read only to adopt such a marker (:func:`adopt`)."""
    return "random" if str(path) == "random" else files_fingerprint([path])


def adopt(directory: Path, unit: str, marker: dict[str, Any], spec: str, **key: Any) -> bool:
    """A marker written before markers were keyed by content (it holds a file ``stamp``) still
    counts if ``spec`` is the file it was written for (same path as given, size and mtime): it is
    rewritten with the content ``key`` and True returned. Otherwise False: the unit runs again."""
    if "stamp" not in marker or marker["stamp"] != file_stamp(spec):
        return False
    kept = {k: v for k, v in marker.items() if k not in ("unit", "finished", "stamp")}
    write_marker(directory, unit, **kept, **key, adopted=marker.get("finished"))
    return True


@cache
def conf_digest(conf_dir: str | Path = CONF_DIR) -> str:
    """Hash of the config files and the ``CNNFT_*`` environment variables (what composing a
    config reads besides its overrides)."""
    files = {str(p.relative_to(conf_dir)): file_digest(p) for p in sorted(Path(conf_dir).rglob("*.yaml"))}
    env = {k: v for k, v in os.environ.items() if k.startswith("CNNFT_")}
    return stable_hash({"files": files, "env": env})


def root_spellings(root: Path) -> tuple[str, ...]:
    """The ways paths under ``root`` may be written (as given, absolute, symlinks resolved)."""
    return tuple(sorted({str(root), str(root.absolute()), str(root.resolve())}, key=len, reverse=True))


def unrooted(value: Any, spellings: Sequence[str]) -> Any:
    """``value`` (a string or a container of them) with each path under the root written
    ``<root>/...``, so that it reads the same wherever the root lives and however it is spelled."""
    if isinstance(value, dict):
        return {k: unrooted(v, spellings) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [unrooted(v, spellings) for v in value]
    if isinstance(value, str):
        for base in spellings:
            if value == base or value.startswith(base.rstrip(os.sep) + os.sep):
                return ROOT + value[len(base.rstrip(os.sep)):]
    return value


def config_key(cfg: DictConfig, spellings: Sequence[str]) -> str:
    """Hash of a job's resolved config without the keys in :data:`UNKEYED` (and those of
    :data:`INTRODUCED` at their old value), paths under the root written ``<root>/...``."""
    data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for dotted in (*UNKEYED, *INTRODUCED):
        *parents, last = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and (
                dotted in UNKEYED or node[last] == INTRODUCED[dotted]):
            node.pop(last)
    return stable_hash(unrooted(data, spellings), length=24)


class Digests:
    """Weights digests of checkpoint files (:func:`cnnft.hashing.model_digest` of the network's
    state dict: the same for a file copied, touched or re-saved with equal weights), kept in
    ``<root>/.done/digests.json`` by ``<root>/``-relative path with each file's size and mtime.
    A file is read again only when its size or mtime differs from the remembered ones."""

    def __init__(self, root: Path) -> None:
        self.spellings = root_spellings(root)
        self.path = root / MARKERS / "digests.json"
        self.known: dict[str, dict[str, Any]] = {}
        self.loaded = False

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def __call__(self, spec: str | Path) -> str:
        """The digest of checkpoint ``spec`` (``random`` for the random network)."""
        if str(spec) == "random":
            return "random"
        if not self.loaded:
            self.known, self.loaded = self._read(), True
        name = unrooted(str(Path(spec).absolute()), self.spellings)
        st = os.stat(spec)
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(name)
        if entry is not None and entry.get("stamp") == stamp:
            return str(entry["digest"])
        digest = model_digest(model_state(read_checkpoint(spec), spec))
        self.known[name] = {"stamp": stamp, "digest": digest}
        if is_rank_zero():  # merged with what other calls wrote meanwhile
            write_json(self.path, {**self._read(), name: self.known[name]})
        return digest


def analysis_done(directory: Path, unit: str, checkpoint: Callable[[], str], digests: Digests,
                  inputs: Callable[[str], str], key: Callable[[str], dict[str, str]]) -> bool:
    """Whether analysis ``unit``'s marker in ``directory`` holds for its checkpoint (``checkpoint()``,
    asked only if there is a marker): the same weights digest, then the same ``inputs(spec)`` hash
    (fast) or else the same resolved config (``key(spec)``, which composes it; the marker is then
    updated so that the next call is fast). A marker of an older version is adopted (:func:`adopt`)."""
    marker = read_marker(directory, unit)
    spec = checkpoint() if marker is not None else ""
    if marker is None or (spec != "random" and not Path(spec).is_file()):
        return False
    try:
        if "weights" not in marker:
            return adopt(directory, unit, marker, spec, **key(spec))
        if marker["weights"] != digests(spec):
            return False
    except CheckpointError:
        return False  # unreadable: the job says why
    if marker.get("inputs") == inputs(spec):
        return True
    content = key(spec)  # other inputs (conf/ edited, an override added): compare configs
    if marker.get("config") != content["config"]:
        return False
    kept = {k: v for k, v in marker.items() if k != "unit"}
    write_marker(directory, unit, **{**kept, **content})
    return True


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")

# ---------------------------------------------------------------- reproduce.json


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """What the report's header states about the run: scale, model, data roots, pretrained weights."""
    data = OmegaConf.select(cfg, "data", default={}) or {}
    return {"scale": str(cfg.scale.name), "imagenet_root": str(data.get("imagenet_root", "")),
            "voc_root": str(data.get("voc_root", "")), "pretrained": cfg.pretrained,
            "model": model_label(cfg.model), "probe_layers": list(cfg.model.probe_layers),
            "unit_layer": str(cfg.model.unit_layer), "first_conv": str(cfg.model.first_conv)}


def call_info(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """One call of this command as ``reproduce.json`` lists it: start, stages, overrides,
    commit, machine and ``status`` (``unfinished`` until it ends, then ``ok`` or ``failed``)."""
    from cnnft.report.load import git_commit

    return {"id": uuid.uuid4().hex[:12], "started": now(), "stages": list(cfg.stages),
            "overrides": list(overrides), "commit": git_commit(),
            "machine": f"{os.cpu_count()} CPU cores, "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
            "status": "unfinished"}


def merge_status(saved: dict[str, Any], info: dict[str, Any], call: dict[str, Any],
                 units: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``reproduce.json`` with one call merged in: the run's facts (``info``) as of this call;
    ``started``, when the first call began; ``calls``, every call in order (this one replaced by
    its ``id``); ``units``, each unit's latest status and wall time with the number of the call
    that set it (units this call did not reach are kept). ``saved`` may be in the one-call
    layout of older versions."""
    from cnnft.report.load import reproduce_calls

    calls = reproduce_calls(saved)
    ids = [c.get("id") for c in calls]
    if call["id"] in ids:
        calls[ids.index(call["id"])] = call
    else:
        calls.append(call)
    number = [c.get("id") for c in calls].index(call["id"]) + 1
    merged = {**(saved.get("units") or {}), **{k: {**v, "call": number} for k, v in units.items()}}
    return {**info, "started": calls[0].get("started"), "calls": calls, "units": merged}


def record_call(path: Path, info: dict[str, Any], call: dict[str, Any],
                units: dict[str, dict[str, Any]]) -> None:
    """Merge this call into ``path`` (read again each time: other calls may write it too), atomically."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        saved = {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); starting its history anew", path, e)
        saved = {}
    write_json(path, merge_status(saved if isinstance(saved, dict) else {}, info, call, units))

