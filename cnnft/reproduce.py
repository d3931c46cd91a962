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
:func:`cnnft.analyze.analyze`) with its config composed by Hydra's compose API
(:func:`cnnft.task.compose_job`: ``conf/train.yaml`` / ``conf/analyze.yaml``, the run directory
given as ``paths.output_dir``), and W&B ended after it (:func:`cnnft.task.finishing_wandb`).

Overrides. ``conf/reproduce.yaml`` composes the config groups that training and analysis share
(``paths``, ``scale`` with its ``data``/``model``/``recipe`` nodes, ``proposals``, ``logger``,
``probe``; and ``trainer``, ``debug`` that only training has), so Hydra checks every override
of this command against them. Each override that is not one of this command's own keys
(:data:`OWN_KEYS`) is forwarded whole, as given, to each kind of job whose config has its
top-level key or group: Hydra's override parser reads the key, the job's composed config and
its defaults-list choices say what it has (:func:`forward`). So ``trainer=ddp`` and
``debug=fast`` reach the training stages, ``data.*``, ``recipe.*``, ``probe.*``, ``scale=``,
``logger=csv`` both kinds; ``train_overrides=[...]`` / ``analyze_overrides=[...]`` reach one
kind only (and may name keys this command lacks: ``callbacks.*``, ``batch_size``). A unit's own
overrides (its stage, checkpoint, directory) come last and win.

Before anything is written, the job configs the selected stages compose are checked for the
mandatory values they need (``scale=paper``: ``data.imagenet_root``, ``data.voc_root``).

A unit that succeeded writes a done marker (:mod:`cnnft.reproduce_state`: keyed by content, so a
moved, copied or re-spelled root is recognised); a later call skips it. A killed training stage
has no marker and continues from its ``checkpoints/last.ckpt`` (``resume=auto``, bit-exact on
the CPU). An analysis reruns when the weights digest of its checkpoint or its resolved config
changed (a re-trained network, a new override), not when a checkpoint was merely touched or
copied. A failing unit is logged and recorded (``<root>/reproduce.json``, the report) and the
others go on; the command exits non-zero at the end. ``reproduce.json`` keeps every call
(start, stages, overrides, commit, status) and each unit's latest status and time.

(Over 400 lines with this docstring: one class of units and one run loop, read together; what
persists between calls, markers, digests and history, is :mod:`cnnft.reproduce_state`.)
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cnnft.callbacks import snapshot_name
from cnnft.checkpoint import read_checkpoint, wrap_state_dict
from cnnft.cli import HINTS, command, missing_values
from cnnft.errors import CheckpointError, ConfigError
from cnnft.hashing import stable_hash
from cnnft.io import atomic_write
from cnnft.models.build import validate_model
from cnnft.reproduce_state import (
    ROOT,
    Digests,
    adopt,
    analysis_done,
    call_info,
    conf_digest,
    config_key,
    is_rank_zero,
    now,
    read_marker,
    record_call,
    root_spellings,
    run_info,
    unrooted,
    write_failure,
    write_marker,
)
from cnnft.task import compose_job, finishing_wandb, path_override, task_wrapper
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
            "exclude_analyses", "snapshots", "report", "hydra"}


# ---------------------------------------------------------------- overrides


def discover_analyses(conf_dir: str | Path = CONF_DIR) -> list[str]:
    """Every analysis with a ``conf/analyses/<name>.yaml`` (plugins merged later join by themselves)."""
    return sorted(p.stem for p in (Path(conf_dir) / "analyses").glob("*.yaml"))


def override_key(line: str) -> str:
    """The top-level key or group an override sets (Hydra's parser): ``+trainer.devices=2`` ->
    ``trainer``, ``hydra/launcher=slurm`` -> ``hydra``."""
    key = OverridesParser.create().parse_override(line).key_or_group
    return key.split("/")[0].split(".")[0]


@cache
def config_keys(name: str) -> frozenset[str]:
    """Top-level keys and config groups of ``conf/<name>.yaml`` as composed."""
    cfg = compose_job(name, return_hydra_config=True)
    groups = {str(g).split("/")[0] for g in cfg.hydra.runtime.choices}
    return frozenset({str(k) for k in cfg if k != "hydra"} | groups - {"hydra"})


def forward(overrides: Sequence[str], name: str, own: Sequence[str] = ()) -> list[str]:
    """The overrides meant for ``conf/<name>.yaml``: those whose key it has, except this
    command's own keys and the keys in ``own`` (set by the unit itself)."""
    keys, skip = config_keys(name), OWN_KEYS | {override_key(o) for o in own}
    return [o for o in overrides if override_key(o) in keys and override_key(o) not in skip]




@dataclass
class Unit:
    """One step of the pipeline: ``run()`` does the work; ``done()`` says it is already done."""

    name: str
    run: Callable[[], Any]
    done: Callable[[], bool]
    needs: tuple[str, ...] = ()
    directory: Path | None = None


@dataclass

@dataclass
class Pipeline:
    """The units of one ``cnnft-reproduce`` call and the overrides forwarded to them. Checks the
    stages and the data roots the selected stages need when built (before anything is written)."""

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
        self.check_data()

    # ------------------------------------------------------------ job configs
    def job(self, name: str, overrides: Sequence[str], output_dir: Path) -> DictConfig:
        return compose_job(name, overrides, output_dir)

    def train_overrides(self, stage: str, pretrained: str | None) -> list[str]:
        own = [*TRAIN_STAGES[stage], "resume=auto", f"run_name={stage}",
               *([path_override("pretrained", pretrained)] if pretrained else [])]
        return [*forward([*self.overrides, *self.cfg.train_overrides], "train", own), *own]

    def analyze_overrides(self, spec: str, analysis: str, label: str, extra: Sequence[str]) -> list[str]:
        own = [path_override("checkpoint", spec), f"analyses=[{analysis}]",
               f"run_name={label.replace('/', '-')}", *extra]
        return [*forward([*self.overrides, *self.cfg.analyze_overrides], "analyze", own), *own]

    def check_data(self) -> None:
        """Refuse the call, naming each mandatory value (``data.imagenet_root``, ...) that a
        selected stage's job needs and nobody gave."""
        stages = set(self.cfg.stages)
        jobs = []
        if "pretrain" in stages and not self.cfg.pretrained:
            jobs.append(("train", self.train_overrides("pretrain", None), "datamodule"))
        if stages & {"finetune_all", "finetune_fc", "fifty_fifty"}:
            jobs.append(("train", self.train_overrides("finetune_all", "x.ckpt"), "datamodule"))
        if "analyze" in stages:
            jobs.append(("analyze", self.analyze_overrides("random", "probe_cls", "check", []),
                         "data.voc_root"))
        missing = dict.fromkeys(m for name, over, key in jobs
                                for m in missing_values(self.job(name, over, self.root), key))
        if missing:
            raise ConfigError("; ".join(f"{key} is missing: pass {HINTS.get(key, key + '=VALUE')}"
                                        for key in missing))

    # ------------------------------------------------------------ training
    def pretrained_checkpoint(self) -> str:
        """What the fine-tuning stages start from: ``pretrained=`` or our pretraining's last."""
        return str(self.cfg.pretrained or self.root / "pretrain" / "checkpoints" / "last.ckpt")

    def fifty_fifty_checkpoint(self) -> str:
        cfg = self.job("train", self.train_overrides("fifty_fifty", None), self.root / "fifty_fifty")
        iteration = int(cfg.recipe.fifty_fifty.pretrain_iteration)
        return str(self.root / "pretrain" / "snapshots" / snapshot_name(iteration))

    def train_unit(self, stage: str) -> Unit:
        out = self.root / stage
        last = out / "checkpoints" / "last.ckpt"

        def run() -> None:
            from cnnft.train import train

            source = (None if stage == "pretrain" else self.fifty_fifty_checkpoint()
                      if stage == "fifty_fifty" else self.pretrained_checkpoint())
            if source is not None and not Path(source).is_file():
                raise ConfigError(f"stage {stage} starts from {source}, which does not exist; run the "
                                  "pretrain stage first (or give pretrained=PATH)")
            began = time.perf_counter()
            source_weights = self.digests(source) if source is not None else None
            cfg = self.job("train", self.train_overrides(stage, source), out)
            with finishing_wandb():
                metrics, _ = train(cfg)
            write_marker(out, stage, wall_s=round(time.perf_counter() - began, 1),
                         pretrained=unrooted(source, self.spellings), source_weights=source_weights,
                         weights=self.digests(last) if last.is_file() else None, metrics=metrics)

        def done() -> bool:
            marker = read_marker(out, stage)
            if marker is None or not last.is_file():
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

        return Unit(stage, run, done, () if stage == "pretrain" else ("pretrain",), out)

    # ------------------------------------------------------------ analyses
    def network_checkpoint(self, network: str) -> str:
        if network in ("random", "control"):  # control: the low-level baseline reads no weights
            return "random"
        if network == "pretrained" and self.cfg.pretrained:
            return self.as_cnnft_checkpoint(str(self.cfg.pretrained))
        folder = "pretrain" if network == "pretrained" else network
        return str(self.root / folder / "checkpoints" / "last.ckpt")

    def as_cnnft_checkpoint(self, path: str) -> str:
        """``pretrained=`` may be a bare CaffeNet state dict; cnnft-analyze needs a cnnft
        checkpoint: wrap it once (:func:`cnnft.checkpoint.wrap_state_dict`) into
        ``<root>/pretrained/network.ckpt``, the network geometry from the analysis config."""
        if not Path(path).is_file():
            return path
        ckpt = read_checkpoint(path)
        if "cnnft" in ckpt:
            return path
        fmt = self.cfg.get("pretrained_format", "cnnft")
        target = self.root / "pretrained" / "network.ckpt"
        marker, weights = read_marker(target.parent, "wrap"), self.digests(path)
        if target.is_file() and marker is not None and marker.get("format", "cnnft") == fmt and (
                marker.get("weights") == weights
                or adopt(target.parent, "wrap", marker, path, weights=weights)):
            return str(target)
        cfg = self.job("analyze", [*forward(self.overrides, "analyze"), "checkpoint=random"], target.parent)
        wrapped = wrap_state_dict(ckpt, path, OmegaConf.to_container(cfg.model, resolve=True), fmt)  # type: ignore[arg-type]
        atomic_write(target, lambda tmp: torch.save(wrapped, tmp))
        write_marker(target.parent, "wrap", weights=weights, format=fmt,
                     source=unrooted(str(path), self.spellings))
        return str(target)

    def analysis_unit(self, label: str, network_dir: Path, analysis: str, checkpoint: Callable[[], str],
                      extra: Sequence[str], needs: tuple[str, ...]) -> Unit:
        def overrides(spec: str) -> list[str]:
            return self.analyze_overrides(spec, analysis, label, extra)

        def inputs(spec: str) -> str:
            """Hash of what composing the config reads: conf/, CNNFT_* variables, the overrides
            but the checkpoint's path. Equal inputs give an equal config: no need to compose it."""
            kept = [o for o in overrides(spec) if override_key(o) != "checkpoint"]
            return stable_hash({"overrides": unrooted(kept, self.spellings), "conf": conf_digest()})

        def key(spec: str, cfg: DictConfig | None = None) -> dict[str, str]:
            """What the results depend on: the weights and the config (composed unless given)."""
            cfg = cfg if cfg is not None else self.job("analyze", overrides(spec), network_dir)
            return {"weights": self.digests(spec), "config": config_key(cfg, self.spellings),
                    "inputs": inputs(spec)}

        def run() -> None:
            from cnnft.analyze import analyze

            spec = checkpoint()
            if spec != "random" and not Path(spec).is_file():
                raise ConfigError(f"checkpoint {spec} for {label} does not exist (its training stage "
                                  "has not finished)")
            began = time.perf_counter()
            cfg = self.job("analyze", overrides(spec), network_dir)
            content = key(spec, cfg)  # before the job: analyses may fill in the config
            with finishing_wandb():
                analyze(cfg)
            write_marker(network_dir, analysis, **content, checkpoint=unrooted(spec, self.spellings),
                         wall_s=round(time.perf_counter() - began, 1))

        def done() -> bool:
            return analysis_done(network_dir, analysis, checkpoint, self.digests, inputs, key)

        return Unit(label, run, done, needs, network_dir)

    def network_units(self) -> list[Unit]:
        skip = set(self.cfg.get("exclude_analyses") or [])
        everything = [a for a in discover_analyses() if a not in skip]
        units = []
        for network in NETWORKS:
            spec = self.cfg.networks.get(network)
            if spec is None:
                continue
            extra = spec.get("overrides") or {}
            needs = {"pretrained": ("pretrain",), "random": (), "control": ()}.get(network, (network,))
            units += [self.analysis_unit(f"analyze/{network}/{analysis}", self.root / "analyze" / network,
                                         analysis, lambda n=network: self.network_checkpoint(n),
                                         list(extra.get(analysis, [])), needs)
                      for analysis in list(spec.get("analyses") or everything)]
        return units

    def snapshot_units(self) -> list[Unit]:
        """One unit per (snapshot, analysis); the snapshot set is known once pretraining ran."""
        spec = self.cfg.snapshots
        wanted = set(spec.iterations) if spec.get("iterations") else None
        extra = spec.get("overrides") or {}
        return [self.analysis_unit(f"analyze/snapshots/{path.stem}/{analysis}",
                                   self.root / "analyze" / "snapshots" / path.stem, analysis,
                                   lambda p=path: str(p), list(extra.get(analysis, [])), ("pretrain",))
                for path in sorted((self.root / "pretrain" / "snapshots").glob("iter_*.ckpt"))
                if wanted is None or int(path.stem.split("_")[1]) in wanted
                for analysis in spec.analyses]

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


def reproduce(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run the selected stages; return each unit's status (``done``, ``skipped``, ``failed``,
    ``blocked``) with its wall time and error. Also written to ``<root>/reproduce.json``."""
    from rich.console import Console

    validate_model(cfg.model)
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
        call.update(wall_s=round(time.perf_counter() - began, 1), finished=now(),
                    status="failed" if bad else "ok")
        record_call(status_path, info, call, status)
    for name, entry in bad.items():
        console.print(f"[red]{entry['status']}[/red] {name}: {entry.get('error')}")
    return status


def accept(cfg: DictConfig) -> None:
    """Refuse the call before anything is written (bad stages, data roots not given)."""
    Pipeline(cfg, list(HydraConfig.get().overrides.task))


@command
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
@task_wrapper(accept=accept)
def main(cfg: DictConfig) -> None:
    status = reproduce(cfg, list(HydraConfig.get().overrides.task))
    if any(v["status"] in ("failed", "blocked") for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
