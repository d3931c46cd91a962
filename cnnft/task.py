"""A command's Hydra job, two ways: ``@hydra.main`` + :func:`task_wrapper` (run records, the job's
log file, failures, W&B), or :func:`compose_job` (Hydra's compose API, for a program that runs jobs
in-process: ``cnnft-reproduce``, the tests).

Nothing in ``conf/`` reads Hydra's runtime (no ``${hydra:...}``): the job's run directory is the
ordinary key ``paths.output_dir`` and its number in a multirun is ``job_num``. Under
``@hydra.main`` the wrapper sets both from Hydra's runtime (``hydra.run.dir`` follows
``paths.output_dir``; a sweep job's directory is Hydra's); :func:`compose_job` sets
``paths.output_dir`` by override and leaves ``job_num`` at 0.

``cnnft-train`` sets ``hydra.output_subdir: null`` and keeps Hydra's job-log file handler off
the root logger (``conf/hydra/default.yaml``), so that a refused command writes nothing: the
wrapper first runs the job's ``accept`` check (e.g. "this directory holds this same run"), and
only then writes ``.hydra/{config,hydra,overrides}.yaml`` as Hydra would and opens the job log
(``<run dir>/<job name>.log``). Commands whose Hydra config keeps the defaults (cnnft-analyze)
get Hydra's own records and log as before. Either way a failure's error and traceback go to
the job log (the terminal gets them from Hydra), and ``wandb.finish`` runs at the end so that
multirun jobs never merge into one W&B run (:func:`finishing_wandb`, which in-process jobs use
too: the only place that ends a W&B run of a job).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cnnft.io import atomic_write

log = logging.getLogger(__name__)

R = TypeVar("R")


def path_override(key: str, path: str | Path) -> str:
    """``key='path'``: a path as a Hydra override, quoted (spaces, ``=``, brackets, ``,``)."""
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{text}'"


def compose_job(name: str, overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                return_hydra_config: bool = False) -> DictConfig:
    """``conf/<name>.yaml`` composed with ``overrides`` as its command would (Hydra's compose API),
    run directory ``output_dir`` (``paths.output_dir``). Inside a running Hydra app (e.g.
    ``cnnft-reproduce``) its config search path is used, so ``--config-dir`` additions count.
    ``return_hydra_config``: keep the ``hydra`` node (group choices in ``hydra.runtime.choices``)."""
    from cnnft.train import CONF_DIR

    wanted = list(overrides)
    if output_dir is not None:
        wanted.append(path_override("paths.output_dir", output_dir))
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=wanted, return_hydra_config=return_hydra_config)
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(name, overrides=wanted, return_hydra_config=return_hydra_config)


def adopt_hydra_run(cfg: DictConfig) -> None:
    """Under ``@hydra.main``: ``paths.output_dir`` is Hydra's run (or sweep job) directory and
    ``job_num`` the job's number (where the config has that key)."""
    runtime = HydraConfig.get()
    cfg.paths.output_dir = runtime.runtime.output_dir
    if "job_num" in cfg:
        cfg.job_num = runtime.job.get("num", 0)


@contextmanager
def finishing_wandb() -> Iterator[None]:
    """End the job's W&B run when the block ends, whatever happens (never let jobs merge)."""
    failed = True
    try:
        yield
        failed = False
    finally:
        finish_wandb(failed)


def write_hydra_records(cfg: DictConfig, output_dir: Path, subdir: str = ".hydra") -> None:
    """Hydra's run records (the job's config, Hydra's config and the overrides) as it writes
    them, for a job whose ``hydra.output_subdir`` is null. Rank zero only: Lightning's DDP
    launcher starts the other ranks with ``hydra.output_subdir=null`` too."""
    hydra_cfg = HydraConfig.instance().cfg
    records = {"config.yaml": cfg, "hydra.yaml": hydra_cfg,
               "overrides.yaml": hydra_cfg.hydra.overrides.task}  # type: ignore[union-attr]
    for name, node in records.items():
        text = OmegaConf.to_yaml(node)
        atomic_write(output_dir / subdir / name, lambda tmp, text=text: tmp.write_text(text))


def open_job_log() -> logging.Handler | None:
    """Attach the job log ``<run dir>/<job name>.log`` (where Hydra's job-log file handler
    writes) to the root logger, formatted as Hydra's, unless a handler already writes it;
    returns the handler attached."""
    hydra_cfg = HydraConfig.get()
    filename = (Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log").resolve()
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(filename) for h in root.handlers):
        return None
    handler = logging.FileHandler(filename, encoding="utf-8")
    fmt = OmegaConf.select(hydra_cfg, "job_logging.formatters.simple.format",
                           default="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    return handler


def log_failure(exc: BaseException) -> None:
    """Write ``exc`` and its traceback to the job log files only (Hydra prints it on the
    terminal)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "job failed: %s: %s",
                            (type(exc).__name__, exc), (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def finish_wandb(failed: bool) -> None:
    """End the W&B run of this job, if W&B was used (never let multirun jobs merge)."""
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].finish(exit_code=1 if failed else None)


def task_wrapper(accept: Callable[[DictConfig], Any] | None = None
                 ) -> Callable[[Callable[[DictConfig], R]], Callable[[DictConfig], R]]:
    """Decorate a Hydra job: the run directory and job number from Hydra (:func:`adopt_hydra_run`),
    ``accept(cfg)`` (it raises to refuse the run, and must write nothing), then the run records
    and the job log, then the job; a failure is logged to the job log; W&B is finished whatever
    happens."""

    def decorate(job: Callable[[DictConfig], R]) -> Callable[[DictConfig], R]:
        @functools.wraps(job)
        def wrapped(cfg: DictConfig) -> R:
            handler = None
            try:
                with finishing_wandb():
                    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
                    if hydra_cfg is not None:
                        adopt_hydra_run(cfg)
                    if accept is not None:
                        accept(cfg)
                    if hydra_cfg is not None:
                        if hydra_cfg.output_subdir is None and rank_zero_only.rank == 0:
                            write_hydra_records(cfg, Path(hydra_cfg.runtime.output_dir))
                        handler = open_job_log()
                    try:
                        return job(cfg)
                    except Exception as e:
                        log_failure(e)
                        raise
            finally:
                if handler is not None:
                    logging.getLogger().removeHandler(handler)
                    handler.close()

        return wrapped

    return decorate
