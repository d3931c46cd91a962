"""``cnnft-train``: one Hydra job = one training stage (pretrain or finetune).

A thin ``@hydra.main`` wrapper around :func:`train`, which composes the data module, the
module, the callbacks and the loggers from the config and runs ``Trainer.fit``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnft.callbacks import AtomicCheckpointIO
from cnnft.checkpoint import read_checkpoint
from cnnft.cli import command, require
from cnnft.data.demo import DemoSpec, generate_demo
from cnnft.errors import CnnftError, ConfigError
from cnnft.io import atomic_write
from cnnft.models.build import family, validate_model
from cnnft.task import task_wrapper

log = logging.getLogger(__name__)


def conf_dir() -> str:
    """The Hydra configs: ``cnnft/conf`` in an installed wheel (``pyproject.toml`` maps the
    repository's ``conf/`` there), else ``conf/`` beside the source tree (a checkout, an editable
    install). Absolute, so console scripts and ``python -m`` find the same folder."""
    package = Path(__file__).resolve().parent
    inside = package / "conf"
    return str(inside if (inside / "train.yaml").is_file() else package.parent / "conf")


#: The Hydra configs' folder (:func:`conf_dir`).
CONF_DIR = conf_dir()

#: Config keys that define a run: resuming into a directory whose run differs in any of them
#: is refused.
RUN_IDENTITY = ("stage", "scale.name", "model", "datamodule", "module", "freeze", "seed")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets cnnft's own input errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, CnnftError):
            raise e.__cause__ from None
        raise


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (safe for ``weights_only`` loading); a
    mandatory value this stage does not read (``data.voc_root`` when pretraining) stays ``???``."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def _select(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def without_introduced(now: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``now`` without the keys that came later (``cnnft.reproduce_state.INTRODUCED``) where
    ``saved`` lacks them and ``now`` holds the value every run had before them: a run started
    before they existed resumes."""
    import copy

    from cnnft.reproduce_state import INTRODUCED

    now = copy.deepcopy(now)
    for dotted, old in INTRODUCED.items():
        *parents, last = dotted.split(".")
        node, kept = _select(now, ".".join(parents)), _select(saved, ".".join(parents))
        if (isinstance(node, dict) and isinstance(kept, dict) and last in node and last not in kept
                and node[last] == old):
            node.pop(last)
    return now


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, after checking the directory holds this same run."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if cfg.resume not in (True, False, "auto"):
        raise ConfigError(f"resume={cfg.resume!r}; expected true, false or auto")
    if cfg.resume is False:
        if last.exists():
            raise ConfigError(f"{output_dir} already holds a run ({last}); pass resume=true to "
                              "continue it or choose another hydra.run.dir")
        return None
    if cfg.resume == "auto" and not last.exists():
        return None
    if not last.exists():
        raise ConfigError(f"resume=true but {last} does not exist; expected the run directory "
                          "of an earlier cnnft-train job as hydra.run.dir")
    saved = read_checkpoint(last, mmap=True).get("cnnft", {}).get("config")
    if saved is None:
        raise ConfigError(f"{last} is not a cnnft checkpoint; cannot resume from it")
    now = without_introduced(plain(cfg), saved)
    differ = [k for k in RUN_IDENTITY if _select(saved, k) != _select(now, k)]
    if differ:
        raise ConfigError(f"{output_dir} holds another run: its config differs from this one in "
                          f"{differ}; resume with the same settings or choose another directory")
    return last


def checkpoint_state(path: Path | None) -> tuple[int | None, dict[str, Any]]:
    """The global step and the run config stored in a resume checkpoint (None, {} without)."""
    if path is None:
        return None, {}
    ckpt = read_checkpoint(path, mmap=True)
    return int(ckpt["global_step"]), ckpt.get("cnnft", {}).get("config") or {}


def keep_wandb_run(cfg: DictConfig, saved: dict[str, Any]) -> None:
    """One training run = one W&B run: give a W&B logger the run id stored in the resumed
    checkpoint's config (a new id for a new run) and ``resume="allow"``. The id lands in the
    run config, hence in every checkpoint and ``config.yaml``."""
    import secrets

    logger = cfg.get("logger")
    if not logger or "WandbLogger" not in str(logger.get("_target_", "")):
        return
    run_id = logger.get("id") or _select(saved, "logger.id") or secrets.token_hex(4)
    with open_dict(logger):
        logger.id = run_id
        logger.resume = logger.get("resume") or "allow"


def demo_spec(cfg: DictConfig) -> DemoSpec:
    """``data.demo_spec`` as a DemoSpec (YAML lists become the tuples it holds)."""

    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    spec = OmegaConf.to_container(cfg.data.get("demo_spec") or {})
    return DemoSpec(**{k: tuples(v) for k, v in spec.items()})


def prepare_demo_data(cfg: DictConfig) -> None:
    """Write the demo data set on first use (scale=demo)."""
    if cfg.data.get("generate_demo") and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        generate_demo(Path(cfg.paths.data_dir) / "demo", demo_spec(cfg))


def build_loggers(cfg: DictConfig, output_dir: Path, resume_step: int | None = None) -> list:
    """The configured logger, plus a CSV copy of the metrics; CSV alone if W&B is missing.
    ``resume_step``: the step of the checkpoint a resumed run starts from (its CSV keeps the
    rows up to it)."""
    loggers = []
    if cfg.get("logger"):
        try:
            loggers.append(instantiate(cfg.logger))
        except (ImportError, ModuleNotFoundError, InstantiationException) as e:
            cause = e.__cause__ if isinstance(e, InstantiationException) else e
            if not isinstance(cause, (ImportError, ModuleNotFoundError)):
                raise
            log.warning("logger %s unavailable (%s); falling back to CSV", cfg.logger._target_, cause)
    if not any(isinstance(lg, L.pytorch.loggers.CSVLogger) for lg in loggers):
        loggers.append(L.pytorch.loggers.CSVLogger(output_dir, name="csv", version=""))
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.CSVLogger):
            keep_csv_rows(logger, resume_step)
    return loggers


def csv_rows_before(text: str, step: int | None) -> str:
    """The rows of a ``metrics.csv`` text logged before ``step`` (all rows if None).

    Lightning logs the batch that takes ``global_step`` from k to k+1, and the validation
    after it, at step k. A checkpoint at ``global_step`` s holds the batches of rows < s (and
    the validation of row s-1 is not run again); the resumed run logs rows >= s again, so they
    go.
    """
    import csv
    import io

    if step is None:
        return text
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or "step" not in rows[0]:
        return text
    col = rows[0].index("step")
    kept = [rows[0], *(r for r in rows[1:] if r[col] != "" and int(float(r[col])) < step)]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    return out.getvalue()


def keep_csv_rows(logger: L.pytorch.loggers.CSVLogger, resume_step: int | None = None) -> None:
    """Resuming into a run keeps the rows its ``metrics.csv`` already holds, except those the
    resumed run logs again (from the checkpoint's step on, see :func:`csv_rows_before`):
    Lightning's writer deletes the file when it starts, so the rows are put back (and their
    header adopted) right after; new rows append."""
    import csv

    previous = Path(logger.log_dir) / "metrics.csv"
    if rank_zero_only.rank == 0 and previous.is_file():
        text = csv_rows_before(previous.read_text(), resume_step)
        writer = logger.experiment  # Lightning's writer starts here and deletes the file
        atomic_write(previous, lambda tmp: tmp.write_text(text))
        writer.metrics_keys = next(csv.reader(text.splitlines()[:1]), [])


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Instantiate every named entry of ``callbacks`` and ``analyses`` (null entries dropped)."""
    nodes = [*(cfg.get("callbacks") or {}).values(), *(cfg.get("analyses") or {}).values()]
    return [build(node) for node in nodes if node]


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(output_dir / "config.yaml", lambda tmp: tmp.write_text(text))


def check_network(cfg: DictConfig) -> None:
    """A non-CaffeNet model's network, starting weights and freezing scheme, checked on the meta
    device (no memory, no computation) before the data module (proposals) or anything else
    runs; CaffeNet's are checked where its module is built."""
    from cnnft.freeze import FreezeScheme, freezable, resolve
    from cnnft.models.build import training_network

    model = plain(cfg.model)
    if family(model) == "caffenet":
        return
    with torch.device("meta"), warnings.catch_warnings():
        # loading the starting weights checks their names and shapes; copying them is the no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        net = training_network(model, 2, cfg.pretrained)
    resolve(net, FreezeScheme(**plain(cfg.freeze), valid=freezable(net)))


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one stage; return the final metrics and the objects used."""
    output_dir = Path(cfg.paths.output_dir)
    require(cfg, "datamodule", *(["data.voc_root"] if cfg.get("analyses") else []))
    validate_model(cfg.model)
    caffenet = family(cfg.model) == "caffenet"
    if cfg.stage.name == "finetune" and not (cfg.pretrained or (not caffenet and cfg.model.get("weights"))):
        raise ConfigError("stage=finetune needs pretrained=PATH: a cnnft checkpoint (e.g. "
                          "outputs/pretrain/<run>/checkpoints/last.ckpt) or a CaffeNet state dict"
                          + ("" if caffenet else " (or model.weights=PATH: a state dict of the model)"))
    ckpt_path = resume_checkpoint(cfg, output_dir)
    check_network(cfg)
    resume_step, saved = checkpoint_state(ckpt_path)
    keep_wandb_run(cfg, saved)
    L.seed_everything(cfg.seed, workers=True)
    # Caffe's small initial weights make early activations denormal on the CPU: up to 6x slower
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", True)))
    prepare_demo_data(cfg)
    datamodule = build(cfg.datamodule)
    module = build(cfg.module, num_classes=datamodule.num_classes, freeze=plain(cfg.freeze),
                   model=plain(cfg.model), run_config=plain(cfg), _convert_="all", _recursive_=False)
    loggers = build_loggers(cfg, output_dir, resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers,
                                     plugins=[AtomicCheckpointIO()])
    datamodule.check_world_size(trainer.world_size)  # the recipe's batches are global
    save_config(cfg, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def accept_run(cfg: DictConfig) -> None:
    """Refuse the job before anything is written if its directory holds another run."""
    resume_checkpoint(cfg, Path(cfg.paths.output_dir))


@command
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@task_wrapper(accept=accept_run)
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get("val/top1")


if __name__ == "__main__":
    main()
