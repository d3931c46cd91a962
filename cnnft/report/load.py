"""Load what runs left on disk: results tables, figures, training curves, snapshots, failures.

Accepted directories (any mix, ``NAME=DIR`` names a network explicitly):

* a ``cnnft-reproduce`` root (``analyze/<network>/results``, ``analyze/snapshots/iter_*``,
  ``pretrain/``, ``reproduce.json``);
* one run or analysis directory holding ``results/`` (its network from ``NAME=``, its
  ``config.yaml`` or its directory name);
* a directory of snapshot analyses (``iter_*/results``);
* a multirun sweep (sub-directories of the above).

Nothing is recomputed; a missing file is simply absent from the loaded results.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from cnnft.errors import DataError
from cnnft.models.build import model_label
from cnnft.plotting import read_metrics_csv
from cnnft.report.paper import LAYERS, layer_roles, network_of
from cnnft.scores import SUFFIX

log = logging.getLogger(__name__)


def git_commit() -> str:
    """``<sha>`` (+ ``-dirty``) of the source tree, or ``unknown`` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


#: What each call of cnnft-reproduce records in ``reproduce.json`` besides its ``id``.
CALL_KEYS = ("started", "finished", "stages", "overrides", "commit", "machine", "wall_s", "status")


def reproduce_calls(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls a ``reproduce.json`` lists, oldest first. A file written before calls were kept
    (one call's facts at the top level) counts as one call."""
    if "calls" in data:
        return [dict(c) for c in data["calls"]]
    if not data.get("started"):
        return []
    failed = any(u.get("status") in ("failed", "blocked") for u in (data.get("units") or {}).values())
    return [{**{k: data[k] for k in CALL_KEYS if k in data}, "status": "failed" if failed else "ok"}]


@dataclass
class Results:
    """Everything the report reads. ``tables[network][analysis]`` is a results JSON payload."""

    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: ``scores[network][analysis]``: its ``results/<analysis>_scores.npz`` (``cnnft.scores``)
    scores: dict[str, dict[str, Path]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    snapshot_files: dict[int, Path] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    #: paper layer -> the model's layer in that role, for a model other than CaffeNet
    #: (``cnnft.report.paper.layer_roles``); loaded rows already carry the paper's names
    roles: dict[str, str] = field(default_factory=dict)

    def model_layer(self, layer: str) -> str:
        """The model's name for a paper layer (the key in score files)."""
        return self.roles.get(layer, layer)

    def rows(self, network: str, analysis: str) -> list[dict[str, Any]]:
        return list(self.tables.get(network, {}).get(analysis, {}).get("rows", []))

    def has(self, network: str, analysis: str) -> bool:
        return analysis in self.tables.get(network, {})

    def ap(self, analysis: str, network: str, layer: str, ablation: str = "unroll",
           cls: str = "mAP") -> float | None:
        """AP in percent of one (layer, ablation, class) row of a probe/detection table."""
        for row in self.rows(network, analysis):
            if (row.get("layer") == layer and row.get("ablation", "unroll") == ablation
                    and row.get("class") == cls and row.get("ap") is not None):
                return 100.0 * float(row["ap"])
        return None


# ---------------------------------------------------------------- readers


def read_payload(path: Path) -> dict[str, Any]:
    """One ``results/<name>.json``; a clear error for a broken file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read results file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise DataError(f"results file {path} has no 'rows' list; expected the output of "
                        "cnnft.analysis.write_table")
    return data


def read_results_dir(run: Path) -> dict[str, dict[str, Any]]:
    """``{name: payload}`` for every ``results/*.json`` of a run directory."""
    return {p.stem: read_payload(p) for p in sorted((run / "results").glob("*.json"))}


def read_curves(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training curves ``{metric: (steps, values)}`` from a cnnft-train run's ``csv/metrics.csv``
    (``cnnft.plotting.read_metrics_csv``); none when the file is missing or unreadable."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    try:
        return read_metrics_csv(path)
    except DataError as e:  # a broken log must not stop the report
        log.warning("training curves left out: %s", e)
        return {}


def read_failures(directory: Path, prefix: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((directory / ".failed").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"error": f"unreadable failure record {path}"}
        out.append({"unit": f"{prefix}/{path.stem}".strip("/"), "error": data.get("error", "")})
    return out


def run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def guess_network(run: Path) -> str:
    """A run directory's network: from its config (stage, freeze) or its name."""
    cfg = run_config(run)
    stage = (cfg.get("stage") or {}).get("name")
    if stage == "pretrain":
        return "pretrained"
    if stage == "finetune":
        freeze = (cfg.get("freeze") or {}).get("name", "all")
        return network_of(freeze) or f"finetune_{freeze}"
    name = run.name.split("_", 1)[1] if run.name[:1].isdigit() and "_" in run.name else run.name
    return network_of(name) or network_of(name.split("=")[-1]) or run.name


# ---------------------------------------------------------------- loading


def _add_train_run(res: Results, run: Path) -> None:
    """Curves and snapshot files of a pretraining run."""
    if (run_config(run).get("stage") or {}).get("name", "pretrain") != "pretrain":
        return
    res.curves = res.curves or read_curves(run)
    for snap in sorted((run / "snapshots").glob("iter_*.ckpt")):
        res.snapshot_files.setdefault(int(snap.stem.split("_")[1]), snap)


def _add_network(res: Results, network: str, run: Path) -> None:
    res.tables.setdefault(network, {}).update(read_results_dir(run))
    res.scores.setdefault(network, {}).update(
        {p.name[:-len(SUFFIX)]: p for p in sorted((run / "results").glob(f"*{SUFFIX}"))})
    res.figures.setdefault(network, []).extend(sorted((run / "figures").glob("*.png")))
    res.failures += read_failures(run, f"analyze/{network}")


def _add_snapshots(res: Results, folder: Path) -> None:
    for run in sorted(folder.glob("iter_*")):
        if run.is_dir():
            iteration = int(run.name.split("_")[1])
            res.snapshots.setdefault(iteration, {}).update(read_results_dir(run))
            res.failures += read_failures(run, f"analyze/snapshots/{run.name}")


def _add_root(res: Results, root: Path) -> None:
    for path in sorted((root / "analyze").iterdir()):
        if path.name == "snapshots":
            _add_snapshots(res, path)
        elif path.is_dir():
            _add_network(res, path.name, path)
    if (root / "pretrain").is_dir():
        _add_train_run(res, root / "pretrain")
    for stage in ("pretrain", "finetune_all", "finetune_fc", "fifty_fifty"):
        res.failures += read_failures(root / stage, "")
    status = root / "reproduce.json"
    if status.is_file():
        data = json.loads(status.read_text())
        res.stages.update(data.get("units", {}))
        calls = reproduce_calls(data)
        latest = calls[-1] if calls else {}
        res.info = {**{k: v for k, v in data.items() if k != "units"},
                    **{k: latest[k] for k in ("commit", "machine") if k in latest},
                    "calls": calls, **res.info}
    for key, value in _info_from_config(root / "pretrain").items():  # what reproduce.json lacks
        if res.info.get(key) is None:
            res.info[key] = value


def _info_from_config(run: Path) -> dict[str, Any]:
    cfg = run_config(run)
    if not cfg:
        return {}
    data = cfg.get("data") or {}
    model = cfg.get("model") or {}
    return {"scale": (cfg.get("scale") or {}).get("name"), "imagenet_root": data.get("imagenet_root"),
            "voc_root": data.get("voc_root"), "model": model_label(model),
            "probe_layers": model.get("probe_layers"), "unit_layer": model.get("unit_layer"),
            "first_conv": model.get("first_conv")}


def align_layers(res: Results) -> None:
    """For a model other than CaffeNet, name each loaded row's layer by the paper layer whose role
    it plays (``layer_roles``; its own name kept as ``model_layer``), so tables, claims and
    figures read it; rows of layers without a role keep their names."""
    roles = layer_roles(res.info.get("probe_layers"), res.info.get("unit_layer"))
    if roles == {layer: layer for layer in LAYERS}:
        return
    res.roles = roles
    paper_of = {model: paper for paper, model in roles.items()}
    payloads = [p for by_name in (*res.tables.values(), *res.snapshots.values()) for p in by_name.values()]
    for payload in payloads:
        payload["rows"] = [{**row, "layer": paper_of[row["layer"]], "model_layer": row["layer"]}
                           if row.get("layer") in paper_of else row for row in payload["rows"]]


def split_spec(spec: str | Path) -> tuple[str | None, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a plain directory (which may contain ``=``) -> (None, DIR)."""
    name, sep, rest = str(spec).partition("=")
    if sep and name and "/" not in name and not Path(str(spec)).exists():
        return name, Path(rest)
    return None, Path(str(spec))


def load_results(dirs: list[str | Path]) -> Results:
    """Load every given directory (see the module docstring) into one :class:`Results`."""
    res = Results()
    for spec in dirs:
        name, path = split_spec(spec)
        if not path.is_dir():
            raise DataError(f"run directory {path} does not exist; expected a cnnft-reproduce root, "
                            "a run directory with results/, or a directory of those")
        res.sources.append(path)
        _load_one(res, path, name)
    res.info.setdefault("commit", git_commit())
    align_layers(res)
    return res


def _load_one(res: Results, path: Path, name: str | None, depth: int = 0) -> None:
    if (path / "analyze").is_dir():
        _add_root(res, path)
    elif (path / "results").is_dir():
        _add_network(res, network_of(name) or name if name else guess_network(path), path)
        _add_train_run(res, path)
        if not res.info.get("scale"):
            res.info.update({k: v for k, v in _info_from_config(path).items() if v})
    elif any(path.glob("iter_*/results")):
        _add_snapshots(res, path)
    elif (path / "snapshots").is_dir() or (path / "csv").is_dir():
        _add_train_run(res, path)
    elif depth == 0:
        subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        for sub in subdirs:
            _load_one(res, sub, None, depth + 1)
