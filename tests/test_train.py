"""In-process training runs on the tiny demo set: files, freezing, resume, bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from cnnft.checkpoint import read_checkpoint
from cnnft.errors import CheckpointError, ConfigError
from cnnft.train import train
from tests.conftest import CONF


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(ckpt)["state_dict"]
    return {k[4:]: v for k, v in state.items() if k.startswith("net.")}


@pytest.fixture()
def pretrained(tiny_cfg, tmp_path: Path) -> Path:
    """A tiny pretraining run; returns its last checkpoint."""
    out = tmp_path / "pretrain"
    train(tiny_cfg(output_dir=out))
    return out / "checkpoints" / "last.ckpt"


def test_pretrain_run_directory(tiny_cfg, pretrained: Path) -> None:
    run = pretrained.parents[1]
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.stage.name == "pretrain" and cfg.module.net.width == 0.125
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "iter_0000002.ckpt", "iter_0000004.ckpt", "iter_0000006.ckpt"]
    ckpt = read_checkpoint(pretrained)
    assert ckpt["global_step"] == 6
    assert ckpt["cnnft"]["arch"] == {"width": 0.125, "input_size": 67, "num_classes": 5}
    metrics = (run / "csv" / "metrics.csv").read_text()
    for key in ("train/loss", "train/lr", "val/top1", "val/top5", "val/class_acc"):
        assert key in metrics, key
    assert not list(run.rglob("*.tmp")), "temporary checkpoint files left behind"


def test_finetune_fc_freezes_and_reinitialises(tiny_cfg, pretrained: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft_fc"
    metrics, objs = train(tiny_cfg("stage=finetune", "freeze=fc", f"pretrained={pretrained}",
                                   output_dir=out))
    before, after = _weights(pretrained), _weights(out / "checkpoints" / "last.ckpt")
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for p in ("weight", "bias"):
            assert torch.equal(before[f"{layer}.{p}"], after[f"{layer}.{p}"]), f"{layer} changed"
    for layer in ("fc6", "fc7"):
        assert not torch.equal(before[f"{layer}.weight"], after[f"{layer}.weight"])
        # not every bias: with the demo's zero-bias init a unit inactive all run keeps bias 0
        assert not torch.equal(after[f"{layer}.bias"], before[f"{layer}.bias"])
    assert after["fc8.weight"].shape[0] == 21
    assert not objs["module"].net.conv3.training and objs["module"].net.fc6.training
    assert "val/top1" in metrics


def test_finetune_all_changes_conv(tiny_cfg, pretrained: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft_all"
    train(tiny_cfg("stage=finetune", "freeze=all", f"pretrained={pretrained}", output_dir=out))
    before, after = _weights(pretrained), _weights(out / "checkpoints" / "last.ckpt")
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_frozen_layers_stay_in_eval_mode(tiny_cfg, pretrained: Path) -> None:
    from hydra.utils import instantiate

    cfg = tiny_cfg("stage=finetune", "freeze=fc", f"pretrained={pretrained}")
    module = instantiate(cfg.module, num_classes=21, freeze=dict(cfg.freeze), _recursive_=False)
    module.train()
    assert not module.net.conv1.training and module.net.fc6.training


def test_kill_and_resume_is_bit_identical(tiny_cfg, tmp_path: Path) -> None:
    """6 steps uninterrupted == 3 steps, crash, resume to 6 (weights and snapshot set)."""
    common = ("trainer.deterministic=true", "recipe.pretrain.checkpoint_every=3")
    full = tmp_path / "full"
    train(tiny_cfg(*common, output_dir=full))

    crashed = tmp_path / "crashed"
    cfg = tiny_cfg(*common, "+callbacks.crash._target_=tests.crash.CrashAt",
                   "+callbacks.crash.step=4", output_dir=crashed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    assert read_checkpoint(crashed / "checkpoints" / "last.ckpt")["global_step"] == 3
    train(tiny_cfg(*common, "resume=true", output_dir=crashed))
    with (crashed / "csv" / "metrics.csv").open() as f:  # the rows before the crash are kept
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert {0, 1, 2, 3, 4, 5} <= steps

    a, b = _weights(full / "checkpoints/last.ckpt"), _weights(crashed / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    names = sorted(p.name for p in (full / "snapshots").iterdir())
    assert names == sorted(p.name for p in (crashed / "snapshots").iterdir())
    for name in names:
        sa, sb = _weights(full / "snapshots" / name), _weights(crashed / "snapshots" / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# ---------------------------------------------------------------- bad input


def test_unknown_freeze_scheme_lists_options() -> None:
    GlobalHydra.instance().clear()
    with (initialize_config_dir(version_base="1.3", config_dir=str(CONF)),
          pytest.raises(MissingConfigException, match="(?s)frobnicate.*fc")):
        compose("train", overrides=["freeze=frobnicate"])


def test_unknown_freeze_layer_lists_layers(tiny_cfg, pretrained: Path) -> None:
    cfg = tiny_cfg("stage=finetune", f"pretrained={pretrained}", "freeze.frozen=[conv9]")
    with pytest.raises(ConfigError, match=r"conv9.*valid layers.*conv1"):
        train(cfg)


def test_finetune_needs_pretrained(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="pretrained=PATH"):
        train(tiny_cfg("stage=finetune"))


def test_foreign_checkpoint_is_refused(tiny_cfg, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "pytorch-lightning_version": "2.0"}, foreign)
    with pytest.raises(CheckpointError, match="not a cnnft one"):
        train(tiny_cfg("stage=finetune", f"pretrained={foreign}"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        train(tiny_cfg("stage=finetune", f"pretrained={junk}"))


def test_other_architecture_is_refused(tiny_cfg, pretrained: Path) -> None:
    cfg = tiny_cfg("stage=finetune", f"pretrained={pretrained}", "model.width=0.25")
    with pytest.raises(CheckpointError, match="different architecture.*width: checkpoint 0.125"):
        train(cfg)


def test_resume_into_directory_of_another_run(tiny_cfg, pretrained: Path) -> None:
    run = pretrained.parents[1]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_cfg(output_dir=run))
    with pytest.raises(ConfigError, match=r"holds another run.*'seed'"):
        train(tiny_cfg("resume=true", "seed=7", output_dir=run))


def test_missing_data_root(tiny_cfg, tmp_path: Path) -> None:
    from cnnft.errors import DataError

    cfg = tiny_cfg("data.generate_demo=false", f"data.imagenet_root={tmp_path}/nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train(cfg)


def test_corrupt_image_named_or_skipped(tiny_cfg, data_dir: Path, tmp_path: Path) -> None:
    """A broken JPEG: an error naming it, or with skip_corrupt a logged, counted skip."""
    import shutil

    from cnnft.errors import CorruptImageError

    root = tmp_path / "imagenet"
    shutil.copytree(data_dir / "demo" / "imagenet", root)
    victims = sorted((root / "train").rglob("*.JPEG"))
    for victim in victims:
        victim.write_bytes(b"\xff\xd8 broken")
    base = ("data.generate_demo=false", f"data.imagenet_root={root}")
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*\.JPEG"):
        train(tiny_cfg(*base, output_dir=tmp_path / "a"))
    metrics, _ = train(tiny_cfg(*base, "data.skip_corrupt=true", "recipe.pretrain.max_steps=2",
                                output_dir=tmp_path / "b"))
    assert metrics["train/skipped"] == 16  # 2 steps x 8 images, all broken


def test_every_config_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for over in (["stage=pretrain"], ["stage=finetune", "freeze=fc"],
                     ["scale=paper", "data.imagenet_root=/x", "data.voc_root=/y"],
                     ["experiment=fifty_fifty"], ["trainer=ddp"], ["debug=fast"],
                     ["logger=tensorboard"], ["freeze=upto_conv3"]):
            cfg = compose("train", overrides=over, return_hydra_config=True)
            assert cfg.datamodule._target_.startswith("cnnft.data")
            HydraConfig.instance().set_config(cfg)
            OmegaConf.resolve(cfg.logger)  # every key the logger names exists (W&B's run name)
        cfg = compose("analyze", overrides=["logger=wandb"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert OmegaConf.to_container(cfg.logger, resolve=True)["offline"] is True
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp"],
                      return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes


def test_cli_help_runs() -> None:
    script = Path(sys.executable).parent / "cnnft-train"  # the console script, not python -m
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "freeze: all, fc, upto_conv1" in out.stdout
    assert "stage: finetune, pretrain" in out.stdout and "scale: demo, paper" in out.stdout
