"""Shared fixtures: a tiny generated data set and composed configs for in-process runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnft.task import compose_job

CONF = Path(__file__).resolve().parents[1] / "conf"

#: Tiny demo data and a tiny net: every in-process run takes seconds.
TINY_DATA = [
    "data.demo_spec.imagenet_classes=5", "data.demo_spec.imagenet_train_per_class=8",
    "data.demo_spec.imagenet_val_per_class=2", "data.demo_spec.voc_trainval=24",
    "data.demo_spec.voc_test=24", "data.demo_spec.imagenet_size=[80,80]",
    "data.demo_spec.voc_size_range=[[90,120],[80,100]]",
]
TINY_RUN = TINY_DATA + [
    "model.width=0.125", "model.input_size=67", "model.resize=76", "model.context_pad=5",
    "data.num_workers=0", "logger=csv", "callbacks.progress_bar=null",
    "recipe.pretrain.batch_size=8", "recipe.pretrain.max_steps=6", "recipe.pretrain.val_every=3",
    "recipe.pretrain.checkpoint_every=3", "recipe.pretrain.snapshots=[2,4,6]",
    "recipe.finetune.batch_size=8", "recipe.finetune.fg_per_batch=2",
    "recipe.finetune.max_steps=4", "recipe.finetune.val_every=2",
    "recipe.finetune.checkpoint_every=2", "recipe.finetune.snapshots=[]",
    "recipe.finetune.val_batches=1", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]


def compose_cfg(overrides: list[str], output_dir: Path, data_dir: Path, name: str = "train") -> DictConfig:
    """Compose ``conf/<name>.yaml`` as cnnft-reproduce does (:func:`cnnft.task.compose_job`), with
    the run directory set, outside any Hydra app (no Hydra state left by other tests)."""
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]
    return compose_job(name, [f"paths.data_dir={data_dir}", *overrides], output_dir)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the tiny demo set (and, once computed, its proposal cache)."""
    from cnnft.data.demo import generate_demo
    from cnnft.train import demo_spec

    root = tmp_path_factory.mktemp("data")
    generate_demo(root / "demo", demo_spec(compose_cfg(TINY_RUN, root / "unused", root)),
                  progress=False)
    return root


@pytest.fixture()
def tiny_cfg(data_dir: Path, tmp_path: Path):
    """``tiny_cfg(*overrides)`` -> a config for a tiny run in a fresh directory."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg([*TINY_RUN, *overrides], output_dir or tmp_path / "run", data_dir)

    return make
