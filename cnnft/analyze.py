"""``cnnft-analyze``: run analyses on existing checkpoints, outside training.

``checkpoint=`` is a checkpoint file, a directory (every ``*.ckpt`` in it, e.g. a run's
``snapshots/``, each analysed into its own sub-directory named after the file), ``random``
(a randomly initialised network of ``model=``: the baseline row of the paper's tables), or
``weights`` (the network of ``model=`` with the state dict in ``model.weights``, e.g. a
torchvision weights file on disk). The network's
geometry (width, input size, mean, context padding) comes from the checkpoint's stored config;
data roots and analysis settings come from this job's config. After the last checkpoint, each
analysis's ``finalize`` writes what combines them (e.g. ``snapshot_eval``'s table over all
iterations) into the job's output directory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnnft.analysis import AnalysisContext
from cnnft.checkpoint import load_pretrained, model_state, read_checkpoint
from cnnft.cli import command, require
from cnnft.data.transforms import resolve_mean
from cnnft.errors import CheckpointError, ConfigError
from cnnft.features import FeatureCache
from cnnft.hashing import file_digest, model_digest
from cnnft.models.build import build_network, family, load_state, model_label
from cnnft.models.caffenet import CaffeNet
from cnnft.task import task_wrapper
from cnnft.train import CONF_DIR, build, build_loggers, prepare_demo_data

log = logging.getLogger(__name__)


def checkpoints(spec: str) -> list[str]:
    """Expand ``checkpoint=``: a file, a directory of ``*.ckpt`` files, or ``random``."""
    if spec in ("random", "weights"):
        return [spec]
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.ckpt"))
        if not found:
            raise CheckpointError(f"checkpoint directory {path} holds no *.ckpt files")
        return found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected a file, a directory of "
                              "*.ckpt files, 'random' or 'weights'")
    return [str(path)]


def load_network(spec: str, cfg: DictConfig) -> tuple[nn.Module, dict[str, Any], str, int | None]:
    """The network of a checkpoint (``random``: a randomly initialised one; ``weights``: the one
    ``model.weights`` holds), its model config, a content digest and the training iteration it
    was saved at."""
    model_cfg: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    if spec == "random":
        torch.manual_seed(cfg.seed)
        net = build_network(model_cfg, cfg.scale.random_classes, load_weights=False)
        return net, model_cfg, "random:" + model_digest(net), 0
    if spec == "weights":
        if not model_cfg.get("weights"):
            raise ConfigError("checkpoint=weights analyses the file in model.weights, which is not set; "
                              "expected model.weights=<a state dict file>")
        net = build_network(model_cfg)
        return net, model_cfg, f"weights:{model_label(model_cfg)}:{file_digest(model_cfg['weights'])}", None
    ckpt = read_checkpoint(spec)
    info = ckpt.get("cnnft")
    if info is None:
        raise CheckpointError(f"{spec} is not a cnnft checkpoint (no 'cnnft' entry); "
                              "expected a checkpoint written by cnnft-train")
    arch = info["arch"]
    model_cfg = {**model_cfg, **info["config"].get("model", {})}
    if family(model_cfg) == "caffenet":
        net = CaffeNet(arch["num_classes"], width=arch["width"], input_size=arch["input_size"])
        load_pretrained(net, spec, skip=())
    else:
        net = build_network({**model_cfg, "input_size": arch["input_size"]}, arch["num_classes"],
                            load_weights=False)
        load_state(net, model_state(ckpt, spec), spec)
    return net, model_cfg, file_digest(spec), ckpt.get("global_step")


def analyze(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run every configured analysis on every checkpoint; returns metrics per checkpoint."""
    require(cfg, "checkpoint", "data.voc_root")
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", True)))
    prepare_demo_data(cfg)
    out = Path(cfg.paths.output_dir)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    analyses = [build(node) for node in (cfg.get("analyses") or {}).values()]
    loggers = build_loggers(cfg, out)
    specs = checkpoints(str(cfg.checkpoint))
    results: dict[str, dict[str, float]] = {}
    for step, spec in enumerate(specs):
        net, model_cfg, digest, ckpt_step = load_network(spec, cfg)
        net.to(device)
        if model_cfg.get("channels_last"):
            net = net.to(memory_format=torch.channels_last)
        target = out if len(specs) == 1 else out / Path(spec).stem
        ctx = AnalysisContext(
            output_dir=target, voc_root=Path(cfg.data.voc_root), model_key=digest,
            input_size=model_cfg["input_size"], context_pad=model_cfg["context_pad"],
            mean=resolve_mean(model_cfg["mean"], model_cfg.get("mean_image")), resize=model_cfg.get("resize"),
            cache=FeatureCache(Path(cfg.paths.cache_dir) / "features"),
            loggers=loggers, step=ckpt_step if ckpt_step is not None else step,
            batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, device=device,
            progress=cfg.progress, checkpoint=None if spec in ("random", "weights") else Path(spec),
            skip_corrupt=bool(cfg.data.get("skip_corrupt", False)))
        metrics: dict[str, float] = {}
        for analysis in analyses:
            log.info("%s on %s", analysis.name, spec)
            # a fresh record of skipped images: each results JSON counts those its analysis read
            metrics.update(analysis.run(net, dataclasses.replace(ctx, skipped={})))
        for logger in loggers:
            logger.log_metrics(metrics, step=ctx.step)
        results[spec] = metrics
        for key, value in sorted(metrics.items()):
            log.info("%s  %s = %.4f", Path(spec).name, key, value)
    for analysis in analyses:
        analysis.finalize(dataclasses.replace(ctx, output_dir=out))
    for logger in loggers:
        logger.finalize("success")
    return results


@command
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
@task_wrapper()
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
