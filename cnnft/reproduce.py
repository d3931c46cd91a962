"""``cnnft-reproduce``: the paper's whole pipeline at a scale, ending in the report.

Stages (``stages=[...]`` selects, in this order)::

    pretrain      cnnft-train stage=pretrain                         -> <root>/pretrain
    finetune_all  cnnft-train stage=finetune freeze=all              -> <root>/finetune_all
    finetune_fc   cnnft-train stage=finetune freeze=fc               -> <root>/finetune_fc
    fifty_fifty   cnnft-train experiment=fifty_fifty from the pretraining snapshot at
                  recipe.fifty_fifty.pretrain_iteration              -> <root>/fifty_fifty
    analyze       cnnft-analyze, one job per (network, analysis)     -> <root>/analyze/<network>
                  networks: pretrained, finetune_all, finetune_fc, fifty_fifty, random, and
                  every pretraining snapshot                          -> <root>/analyze/snapshots/iter_*
    report        cnnft.report.build_report                           -> <root>/report

Each unit is the ordinary in-process entry (:func:`cnnft.train.train`,
:func:`cnnft.analyze.analyze`) with a config composed from ``conf/train.yaml`` /
``conf/analyze.yaml``, the overrides given to this command (each passed to the configs that
have its key or group) and the unit's own, in a fixed run directory. A unit that succeeded
writes a done marker (``.done/<unit>.json``, atomically); a later call skips it. A killed
training stage has no marker and continues from its ``checkpoints/last.ckpt`` (``resume=auto``,
bit-exact on the CPU). Markers hold nothing that depends on where the root lives, so a moved,
copied or re-spelled root is recognised: an analysis marker is keyed by content, the weights
digest of its checkpoint (:class:`Digests`) and a hash of its resolved config without paths
under the root and without the keys in :data:`UNKEYED`; an analysis reruns when either changed
(a re-trained network, a new override), not when a checkpoint was merely touched or copied.
A failing unit is logged and recorded (``<root>/reproduce.json``, the report) and the others go
on; the command exits non-zero at the end. ``reproduce.json`` keeps every call (start, stages,
overrides, commit, status) and each unit's latest status and time, merged across calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnft.callbacks import snapshot_name
from cnnft.checkpoint import model_state, pretrained_state, read_checkpoint
from cnnft.cli import command
from cnnft.errors import CheckpointError, ConfigError
from cnnft.hashing import file_digest, files_fingerprint, model_digest, stable_hash
from cnnft.io import write_json
from cnnft.train import CONF_DIR

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune_all", "finetune_fc", "fifty_fifty", "analyze", "report")
NETWORKS = ("pretrained", "finetune_all", "finetune_fc", "fifty_fifty", "random")
#: The overrides that make each training stage what it is (they win over forwarded ones).
TRAIN_STAGES = {
    "pretrain": ["stage=pretrain"],
    "finetune_all": ["stage=finetune", "freeze=all"],
    "finetune_fc": ["stage=finetune", "freeze=fc"],
    "fifty_fifty": ["experiment=fifty_fifty", "freeze=all"],
}
#: Keys of conf/reproduce.yaml that belong to this command and are never forwarded.
OWN_KEYS = {"root", "stages", "pretrained", "train_overrides", "analyze_overrides", "networks",
            "snapshots", "report", "hydra"}
MARKERS = ".done"
FAILURES = ".failed"
#: Config keys left out of an analysis marker's key: the checkpoint path and the output
#: directory (where the root lives; the checkpoint counts by its weights digest) and what
#: changes how a job runs, not what it computes.
UNKEYED = ("checkpoint", "paths.output_dir", "run_name", "tags", "progress", "logger",
           "data.num_workers")
ROOT = "<root>"


# ---------------------------------------------------------------- overrides and configs


def discover_analyses(conf_dir: str | Path = CONF_DIR) -> list[str]:
    """Every analysis with a ``conf/analyses/<name>.yaml`` (plugins merged later join by themselves)."""
    return sorted(p.stem for p in (Path(conf_dir) / "analyses").glob("*.yaml"))


def override_key(line: str) -> str:
    """The top-level key or group an override sets: ``+trainer.devices=2`` -> ``trainer``."""
    key = line.split("=", 1)[0].lstrip("+~").strip()
    return re.split(r"[./@]", key)[0]


@cache
def config_keys(name: str) -> frozenset[str]:
    """Top-level keys and config groups of ``conf/<name>.yaml`` (after composing its defaults)."""
    with _hydra():
        cfg = compose(name)
    groups = set()
    for entry in OmegaConf.load(Path(CONF_DIR) / f"{name}.yaml").get("defaults", []):
        if isinstance(entry, str):
            groups.add(entry)
        else:
            groups.update(str(k).replace("optional ", "").replace("override ", "").strip() for k in entry)
    return frozenset(set(cfg.keys()) | groups)


def forward(overrides: Sequence[str], name: str, own: Sequence[str] = ()) -> list[str]:
    """The overrides meant for ``conf/<name>.yaml``: those whose key it has, except this
    command's own keys and the keys in ``own`` (set by the unit itself)."""
    keys, skip = config_keys(name), {override_key(o) for o in own}
    return [o for o in overrides
            if override_key(o) in keys and override_key(o) not in OWN_KEYS | skip]


@contextmanager
def _hydra() -> Iterator[None]:
    """Compose from cnnft's conf/ whether or not a Hydra app is already running."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            yield


@contextmanager
def job_config(name: str, overrides: Sequence[str], output_dir: Path) -> Iterator[DictConfig]:
    """Compose ``conf/<name>.yaml`` as its command would, run directory ``output_dir``; the
    ``${hydra:...}`` values point at this job until the block ends."""
    with _hydra():
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    hydra_config.set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(output_dir)
    try:
        yield cfg
    finally:
        hydra_config.cfg = saved


def _finish_wandb() -> None:
    if "wandb" in sys.modules:  # one W&B run per unit, never merged
        sys.modules["wandb"].finish()


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
        write_json(marker_path(directory, unit), {"unit": unit, "finished": _now(), **info})
        (directory / FAILURES / f"{unit}.json").unlink(missing_ok=True)


def write_failure(directory: Path, unit: str, error: BaseException) -> None:
    if is_rank_zero():
        write_json(directory / FAILURES / f"{unit}.json",
                   {"unit": unit, "failed": _now(), "error": f"{type(error).__name__}: {error}",
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
    """Hash of a job's resolved config without the keys in :data:`UNKEYED`, paths under the
    root written ``<root>/...``."""
    data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for dotted in UNKEYED:
        *parents, last = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return stable_hash(unrooted(data, spellings), length=24)


class Digests:
    """Weights digests of checkpoint files (:func:`cnnft.features.model_digest` of the network's
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


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------- units


@dataclass
class Unit:
    """One step of the pipeline: ``run()`` does the work; ``done()`` says it is already done."""

    name: str
    run: Callable[[], Any]
    done: Callable[[], bool]
    needs: tuple[str, ...] = ()
    directory: Path | None = None


@dataclass
class Pipeline:
    """The units of one ``cnnft-reproduce`` call and the overrides forwarded to them."""

    cfg: DictConfig
    overrides: list[str]
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.cfg.root)
        self.spellings = root_spellings(self.root)
        self.digests = Digests(self.root)
        unknown = sorted(set(self.cfg.stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"stages={list(self.cfg.stages)}: unknown {unknown}; expected a subset of "
                              f"{list(STAGES)}")

    # ------------------------------------------------------------ training
    def train_overrides(self, stage: str, pretrained: str | None) -> list[str]:
        own = [*TRAIN_STAGES[stage], "resume=auto", f"run_name={stage}",
               *([f"pretrained={pretrained}"] if pretrained else [])]
        extra = [*self.overrides, *self.cfg.train_overrides]
        return [*forward(extra, "train", own), *own]

    def pretrained_checkpoint(self) -> str:
        """What the fine-tuning stages start from: ``pretrained=`` or our pretraining's last."""
        return str(self.cfg.pretrained or self.root / "pretrain" / "checkpoints" / "last.ckpt")

    def fifty_fifty_checkpoint(self) -> str:
        with job_config("train", self.train_overrides("fifty_fifty", None), self.root / "fifty_fifty") as cfg:
            iteration = int(cfg.recipe.fifty_fifty.pretrain_iteration)
        return str(self.root / "pretrain" / "snapshots" / snapshot_name(iteration))

    def train_unit(self, stage: str) -> Unit:
        out = self.root / stage

        def start() -> str | None:
            if stage == "pretrain":
                return None
            return self.fifty_fifty_checkpoint() if stage == "fifty_fifty" else self.pretrained_checkpoint()

        def run() -> None:
            from cnnft.train import train

            source = start()
            if source is not None and not Path(source).is_file():
                raise ConfigError(f"stage {stage} starts from {source}, which does not exist; run the "
                                  "pretrain stage first (or give pretrained=PATH)")
            began = time.perf_counter()
            source_weights = self.digests(source) if source is not None else None
            with job_config("train", self.train_overrides(stage, source), out) as cfg:
                try:
                    metrics, _ = train(cfg)
                finally:
                    _finish_wandb()
            last = out / "checkpoints" / "last.ckpt"
            write_marker(out, stage, wall_s=round(time.perf_counter() - began, 1),
                         pretrained=unrooted(source, self.spellings), source_weights=source_weights,
                         weights=self.digests(last) if last.is_file() else None, metrics=metrics)

        def done() -> bool:
            marker = read_marker(out, stage)
            if marker is None or not (out / "checkpoints" / "last.ckpt").is_file():
                return False
            source = str(marker.get("pretrained") or "")  # what it was trained from, in this root
            source = str(self.root) + source[len(ROOT):] if source.startswith(ROOT) else source
            if marker.get("source_weights") and Path(source).is_file():
                try:
                    changed = self.digests(source) != marker["source_weights"]
                except CheckpointError:
                    changed = True
                if changed:  # not retrained by itself: resume=auto would only load the finished run
                    log.warning("%s was trained from other weights than %s holds now; it is kept (move "
                                "%s away to train it again from them)", stage, source, out)
            return True

        needs = () if stage == "pretrain" else ("pretrain",)
        return Unit(stage, run, done, needs, out)

    # ------------------------------------------------------------ analyses
    def network_checkpoint(self, network: str) -> str:
        if network == "random":
            return "random"
        if network == "pretrained" and self.cfg.pretrained:
            return self.as_cnnft_checkpoint(str(self.cfg.pretrained))
        if network == "pretrained":
            return str(self.root / "pretrain" / "checkpoints" / "last.ckpt")
        return str(self.root / network / "checkpoints" / "last.ckpt")

    def as_cnnft_checkpoint(self, path: str) -> str:
        """``pretrained=`` may be a bare CaffeNet state dict; cnnft-analyze needs a cnnft
        checkpoint: wrap it once into ``<root>/pretrained/network.ckpt``."""
        if not Path(path).is_file():
            return path
        ckpt = read_checkpoint(path)
        if "cnnft" in ckpt:
            return path
        fmt = self.cfg.get("pretrained_format", "cnnft")
        state = pretrained_state(ckpt, path, fmt)
        target = self.root / "pretrained" / "network.ckpt"
        marker = read_marker(target.parent, "wrap")
        weights = self.digests(path)
        if target.is_file() and marker is not None and marker.get("format", "cnnft") == fmt and (
                marker.get("weights") == weights
                or adopt(target.parent, "wrap", marker, path, weights=weights)):
            return str(target)
        with job_config("analyze", [*forward(self.overrides, "analyze"), "checkpoint=random"],
                        target.parent) as cfg:
            model = OmegaConf.to_container(cfg.model, resolve=True)
        arch = {"width": model["width"], "input_size": model["input_size"],
                "num_classes": int(state["fc8.weight"].shape[0])}
        wrapped = {"cnnft": {"arch": arch, "config": {"model": model}, "source": str(path)},
                   "state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": None}
        from cnnft.io import atomic_write

        atomic_write(target, lambda tmp: torch.save(wrapped, tmp))
        write_marker(target.parent, "wrap", weights=weights, format=fmt,
                     source=unrooted(str(path), self.spellings))
        return str(target)

    def analysis_unit(self, label: str, network_dir: Path, analysis: str, checkpoint: Callable[[], str],
                      extra: Sequence[str], needs: tuple[str, ...]) -> Unit:
        def overrides(spec: str) -> list[str]:
            own = [f"checkpoint={spec}", f"analyses=[{analysis}]", f"run_name={label.replace('/', '-')}",
                   *extra]
            return [*forward([*self.overrides, *self.cfg.analyze_overrides], "analyze", own), *own]

        def inputs(spec: str) -> str:
            """Hash of what composing the config reads: conf/, CNNFT_* variables, the overrides
            but the checkpoint's path. Equal inputs give an equal config: no need to compose it."""
            kept = [o for o in overrides(spec) if override_key(o) != "checkpoint"]
            return stable_hash({"overrides": unrooted(kept, self.spellings), "conf": conf_digest()})

        def key(spec: str, cfg: DictConfig | None = None) -> dict[str, str]:
            """What the results depend on: the weights and the config (composed unless given)."""
            if cfg is None:
                with job_config("analyze", overrides(spec), network_dir) as composed:
                    return key(spec, composed)
            return {"weights": self.digests(spec), "config": config_key(cfg, self.spellings),
                    "inputs": inputs(spec)}

        def run() -> None:
            from cnnft.analyze import analyze

            spec = checkpoint()
            if spec != "random" and not Path(spec).is_file():
                raise ConfigError(f"checkpoint {spec} for {label} does not exist (its training stage "
                                  "has not finished)")
            began = time.perf_counter()
            with job_config("analyze", overrides(spec), network_dir) as cfg:
                content = key(spec, cfg)  # before the job: analyses may fill in the config
                try:
                    analyze(cfg)
                finally:
                    _finish_wandb()
            write_marker(network_dir, analysis, **content, checkpoint=unrooted(spec, self.spellings),
                         wall_s=round(time.perf_counter() - began, 1))

        def done() -> bool:
            marker = read_marker(network_dir, analysis)
            if marker is None:
                return False
            spec = checkpoint()
            if spec != "random" and not Path(spec).is_file():
                return False
            try:
                if "weights" not in marker:
                    return adopt(network_dir, analysis, marker, spec, **key(spec))
                if marker["weights"] != self.digests(spec):
                    return False
            except CheckpointError:
                return False  # unreadable: the job says why
            if marker.get("inputs") == inputs(spec):
                return True
            content = key(spec)  # other inputs (conf/ edited, an override added): compare configs
            if marker.get("config") != content["config"]:
                return False
            kept = {k: v for k, v in marker.items() if k != "unit"}
            write_marker(network_dir, analysis, **{**kept, **content})  # so the next call is fast
            return True

        return Unit(label, run, done, needs, network_dir)

    def network_units(self) -> list[Unit]:
        units = []
        skip = set(self.cfg.get("exclude_analyses") or [])
        everything = [a for a in discover_analyses() if a not in skip]
        for network in NETWORKS:
            spec = self.cfg.networks.get(network)
            if spec is None:
                continue
            analyses = list(spec.get("analyses") or everything)
            extra = spec.get("overrides") or {}
            needs = {"pretrained": ("pretrain",), "random": ()}.get(network, (network,))
            for analysis in analyses:
                units.append(self.analysis_unit(
                    f"analyze/{network}/{analysis}", self.root / "analyze" / network, analysis,
                    lambda n=network: self.network_checkpoint(n), list(extra.get(analysis, [])), needs))
        return units

    def snapshot_units(self) -> list[Unit]:
        """One unit per (snapshot, analysis); the snapshot set is known once pretraining ran."""
        spec = self.cfg.snapshots
        folder = self.root / "pretrain" / "snapshots"
        wanted = set(spec.iterations) if spec.get("iterations") else None
        units = []
        for path in sorted(folder.glob("iter_*.ckpt")):
            iteration = int(path.stem.split("_")[1])
            if wanted is not None and iteration not in wanted:
                continue
            for analysis in spec.analyses:
                units.append(self.analysis_unit(
                    f"analyze/snapshots/{path.stem}/{analysis}",
                    self.root / "analyze" / "snapshots" / path.stem,
                    analysis, lambda p=path: str(p), list((spec.get("overrides") or {}).get(analysis, [])),
                    ("pretrain",)))
        return units

    # ------------------------------------------------------------ report
    def report_unit(self) -> Unit:
        def run() -> None:
            from cnnft.report import build_report

            wandb = self.cfg.report.get("wandb", "auto")
            if wandb == "auto":
                wandb = "WandbLogger" in str(OmegaConf.select(self.cfg, "logger._target_", default=""))
            build_report([self.root], self.root / "report", wandb=bool(wandb))

        return Unit("report", run, lambda: False, (), self.root / "report")

    def units(self, stage: str) -> list[Unit]:
        if stage in TRAIN_STAGES:
            if stage == "pretrain" and self.cfg.pretrained:
                return []
            if (stage == "fifty_fifty" and self.cfg.pretrained
                    and not Path(self.fifty_fifty_checkpoint()).is_file()):
                log.warning("fifty_fifty skipped: pretrained=%s was given and there is no pretraining "
                            "snapshot %s to start the 50-50 network from", self.cfg.pretrained,
                            self.fifty_fifty_checkpoint())
                return []
            return [self.train_unit(stage)]
        if stage == "analyze":
            return [*self.network_units(), *self.snapshot_units()]
        return [self.report_unit()]


# ---------------------------------------------------------------- the run


def stage_bar(done: int, total: int, name: str, elapsed: float, width: int = 24) -> str:
    """``━━━━━━──────  3/12  finetune_fc  (2m05s)``"""
    filled = round(width * done / max(total, 1))
    minutes, seconds = divmod(int(elapsed), 60)
    return f"{'━' * filled}{'─' * (width - filled)}  {done}/{total}  {name}  ({minutes}m{seconds:02d}s)"


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """What the report's header states about the run: scale, data roots, pretrained weights."""
    data = OmegaConf.select(cfg, "data", default={}) or {}
    return {"scale": str(cfg.scale.name), "imagenet_root": str(data.get("imagenet_root", "")),
            "voc_root": str(data.get("voc_root", "")), "pretrained": cfg.pretrained}


def call_info(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """One call of this command as ``reproduce.json`` lists it: start, stages, overrides,
    commit, machine and ``status`` (``unfinished`` until it ends, then ``ok`` or ``failed``)."""
    from cnnft.report.load import git_commit

    return {"id": uuid.uuid4().hex[:12], "started": _now(), "stages": list(cfg.stages),
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


def reproduce(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run the selected stages; return each unit's status (``done``, ``skipped``, ``failed``,
    ``blocked``) with its wall time and error. Also written to ``<root>/reproduce.json``."""
    from rich.console import Console

    pipeline = Pipeline(cfg, list(overrides))
    root = pipeline.root
    console = Console(stderr=True)
    status_path = root / "reproduce.json"
    info, call = run_info(cfg), call_info(cfg, overrides)
    status: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    began = time.perf_counter()
    planned = sum(len(pipeline.units(s)) for s in cfg.stages if s != "analyze") + 1
    count = 0
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        units = pipeline.units(stage)  # analysis units are listed after training ran
        if stage == "analyze":
            planned += len(units) - 1
        for unit in units:
            count += 1
            console.rule(stage_bar(count - 1, planned, unit.name, time.perf_counter() - began), align="left")
            blocked = [n for n in unit.needs if n in failed]
            start = time.perf_counter()
            if unit.name not in TRAIN_STAGES and not is_rank_zero():
                continue  # under a distributed launch only rank zero analyses and reports
            if blocked:
                status[unit.name] = {"status": "blocked", "error": f"needs {blocked}, which failed"}
                failed.add(unit.name)
            elif unit.done():
                marker = read_marker(unit.directory, unit.name.rsplit("/", 1)[-1]) if unit.directory else None
                status[unit.name] = {"status": "skipped", "wall_s": (marker or {}).get("wall_s")}
                log.info("%s: already done, skipped", unit.name)
            else:
                try:
                    unit.run()
                    status[unit.name] = {"status": "done", "wall_s": round(time.perf_counter() - start, 1)}
                except Exception as e:  # record, keep going: one failure must not lose the rest
                    log.exception("%s failed", unit.name)
                    if unit.directory is not None:
                        write_failure(unit.directory, unit.name.rsplit("/", 1)[-1], e)
                    status[unit.name] = {"status": "failed", "wall_s": round(time.perf_counter() - start, 1),
                                         "error": f"{type(e).__name__}: {e}"}
                    failed.add(unit.name)
            if is_rank_zero():
                record_call(status_path, info, {**call, "wall_s": round(time.perf_counter() - began, 1)},
                            status)
    console.rule(stage_bar(count, planned, "finished", time.perf_counter() - began), align="left")
    bad = {k: v for k, v in status.items() if v["status"] in ("failed", "blocked")}
    if is_rank_zero():
        call.update(wall_s=round(time.perf_counter() - began, 1), finished=_now(),
                    status="failed" if bad else "ok")
        record_call(status_path, info, call, status)
    for name, entry in bad.items():
        console.print(f"[red]{entry['status']}[/red] {name}: {entry.get('error')}")
    return status


@command
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    status = reproduce(cfg, overrides)
    if any(v["status"] in ("failed", "blocked") for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
