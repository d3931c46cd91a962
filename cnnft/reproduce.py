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
bit-exact on the CPU). An analysis marker carries the checkpoint's file stamp, so re-trained
networks are analysed again. A failing unit is logged and recorded (``<root>/reproduce.json``,
the report) and the others go on; the command exits non-zero at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
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
from cnnft.checkpoint import model_state, read_checkpoint
from cnnft.errors import ConfigError
from cnnft.io import files_fingerprint, write_json
from cnnft.train import CONF_DIR

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune_all", "finetune_fc", "fifty_fifty", "analyze", "report")
NETWORKS = ("pretrained", "finetune_all", "finetune_fc", "fifty_fifty", "random", "control")
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
    """Changes when the file is rewritten (``random`` for the random network)."""
    return "random" if str(path) == "random" else files_fingerprint([path])


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
            with job_config("train", self.train_overrides(stage, source), out) as cfg:
                try:
                    metrics, _ = train(cfg)
                finally:
                    _finish_wandb()
            write_marker(out, stage, wall_s=round(time.perf_counter() - began, 1), pretrained=source,
                         metrics=metrics)

        def done() -> bool:
            return read_marker(out, stage) is not None and (out / "checkpoints" / "last.ckpt").is_file()

        needs = () if stage == "pretrain" else ("pretrain",)
        return Unit(stage, run, done, needs, out)

    # ------------------------------------------------------------ analyses
    def network_checkpoint(self, network: str) -> str:
        if network in ("random", "control"):  # control: the low-level baseline reads no weights
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
        state = model_state(ckpt, path)
        target = self.root / "pretrained" / "network.ckpt"
        marker = read_marker(target.parent, "wrap")
        if target.is_file() and marker is not None and marker.get("stamp") == file_stamp(path):
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
        write_marker(target.parent, "wrap", stamp=file_stamp(path))
        return str(target)

    def analysis_unit(self, label: str, network_dir: Path, analysis: str, checkpoint: Callable[[], str],
                      extra: Sequence[str], needs: tuple[str, ...]) -> Unit:
        def run() -> None:
            from cnnft.analyze import analyze

            spec = checkpoint()
            if spec != "random" and not Path(spec).is_file():
                raise ConfigError(f"checkpoint {spec} for {label} does not exist (its training stage "
                                  "has not finished)")
            own = [f"checkpoint={spec}", f"analyses=[{analysis}]", f"run_name={label.replace('/', '-')}",
                   *extra]
            overrides = [*forward([*self.overrides, *self.cfg.analyze_overrides], "analyze", own), *own]
            began = time.perf_counter()
            with job_config("analyze", overrides, network_dir) as cfg:
                try:
                    analyze(cfg)
                finally:
                    _finish_wandb()
            write_marker(network_dir, analysis, stamp=file_stamp(spec), checkpoint=spec,
                         wall_s=round(time.perf_counter() - began, 1), overrides=overrides)

        def done() -> bool:
            marker = read_marker(network_dir, analysis)
            if marker is None:
                return False
            spec = checkpoint()
            return (spec == "random" or Path(spec).is_file()) and marker.get("stamp") == file_stamp(spec)

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
            needs = {"pretrained": ("pretrain",), "random": (), "control": ()}.get(network, (network,))
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


def run_info(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """What the report's header states: scale, data roots, overrides, commit, date."""
    from cnnft.report.load import git_commit

    data = OmegaConf.select(cfg, "data", default={}) or {}
    return {"scale": str(cfg.scale.name), "imagenet_root": str(data.get("imagenet_root", "")),
            "voc_root": str(data.get("voc_root", "")), "overrides": list(overrides),
            "pretrained": cfg.pretrained, "commit": git_commit(), "started": _now(),
            "machine": f"{os.cpu_count()} CPU cores, "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"}


def reproduce(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run the selected stages; return each unit's status (``done``, ``skipped``, ``failed``,
    ``blocked``) with its wall time and error. Also written to ``<root>/reproduce.json``."""
    from rich.console import Console

    pipeline = Pipeline(cfg, list(overrides))
    root = pipeline.root
    console = Console(stderr=True)
    status_path = root / "reproduce.json"
    info = {**run_info(cfg, overrides), "stages": list(cfg.stages)}
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
                write_json(status_path, {**info, "wall_s": round(time.perf_counter() - began, 1),
                                         "units": status})
    console.rule(stage_bar(count, planned, "finished", time.perf_counter() - began), align="left")
    bad = {k: v for k, v in status.items() if v["status"] in ("failed", "blocked")}
    for name, entry in bad.items():
        console.print(f"[red]{entry['status']}[/red] {name}: {entry.get('error')}")
    return status


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    status = reproduce(cfg, overrides)
    if any(v["status"] in ("failed", "blocked") for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
