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


# ---------------------------------------------------------------- reliability (issue 14)


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the ``cnnft-train`` console script on this tree."""
    import os

    script = Path(sys.executable).parent / "cnnft-train"
    env = {**os.environ, "PYTHONPATH": str(CONF.parent)}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_between_checkpoints_logs_each_step_once(tiny_cfg, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed at step 5 (checkpoint at 3) and resumed: metrics.csv has every step once, and the
    resumed run continues the same (offline) W&B run without sending a step twice."""
    from wandb.sdk.wandb_run import Run

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent: list[tuple[str, int, bool]] = []
    log = Run.log

    def spy(self: Run, data: dict, *args: object, **kwargs: object) -> None:
        if "trainer/global_step" in data:
            sent.append((self.id, int(data["trainer/global_step"]), "train/loss" in data))
        return log(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", spy)
    common = ("logger=wandb", "trainer.deterministic=true", "recipe.pretrain.checkpoint_every=3")
    run = tmp_path / "crashed"
    cfg = tiny_cfg(*common, "+callbacks.crash._target_=tests.crash.CrashAt",
                   "+callbacks.crash.step=5", output_dir=run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    import wandb

    wandb.finish()
    first = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3
    train(tiny_cfg(*common, "resume=true", output_dir=run))
    wandb.finish()

    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    val_steps = [int(r["step"]) for r in rows if r["val/top1"]]
    assert train_steps == [0, 1, 2, 3, 4, 5]
    assert val_steps == [2, 5]

    run_id = first["cnnft"]["config"]["logger"]["id"]
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["cnnft"]["config"]["logger"]["id"] == run_id
    assert OmegaConf.load(run / "config.yaml").logger.id == run_id
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(p.name.endswith(f"-{run_id}") for p in segments)
    assert {rid for rid, _, _ in sent} == {run_id}
    assert sorted(step for _, step, is_train in sent if is_train) == [0, 1, 2, 3, 4, 5]


def test_csv_fallback_without_wandb(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch.loggers.wandb as lightning_wandb

    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", False)
    cfg = tiny_cfg("logger=wandb", "recipe.pretrain.max_steps=2")
    metrics, objs = train(cfg)
    assert [type(lg).__name__ for lg in objs["trainer"].loggers] == ["CSVLogger"]
    assert "train/loss" in (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()


def test_refused_resume_touches_nothing(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    """resume=true into another run's directory is refused, and every file there (its
    .hydra/ records and train.log included) stays byte-identical."""
    import shutil

    from tests.conftest import TINY_RUN

    run = tmp_path / "other"
    shutil.copytree(pretrained.parents[1], run)
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the other run's {name}\nstage: pretrain\n")
    (run / "train.log").write_text("[the other run's log]\n")
    before = _files(run)
    out = _cli(*TINY_RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", "resume=true",
               "seed=7")
    assert out.returncode != 0
    assert "holds another run" in out.stderr and "'seed'" in out.stderr
    assert _files(run) == before


def test_failed_run_writes_error_to_its_log(data_dir: Path, tmp_path: Path) -> None:
    """A run that fails after starting leaves its error and traceback in train.log (and its
    .hydra/ records, written once the run was accepted)."""
    from tests.conftest import TINY_RUN

    run = tmp_path / "failing"
    out = _cli(*TINY_RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}",
               "data.generate_demo=false", f"data.imagenet_root={tmp_path}/nowhere")
    assert out.returncode != 0 and "nowhere" in out.stderr
    text = (run / "train.log").read_text()
    assert "job failed: DataError" in text and f"{tmp_path}/nowhere" in text
    assert "Traceback (most recent call last)" in text
    assert OmegaConf.load(run / ".hydra" / "config.yaml").data.imagenet_root == f"{tmp_path}/nowhere"
    assert "data.generate_demo=false" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.job.name == "train"


def test_last_checkpoint_is_the_network_trained(tiny_cfg, tmp_path: Path) -> None:
    """max_steps 7 with checkpoint_every 3: last.ckpt holds step 7, the final snapshot's and the
    in-memory network's weights."""
    run = tmp_path / "run"
    _, objs = train(tiny_cfg("recipe.pretrain.max_steps=7", "recipe.pretrain.checkpoint_every=3",
                             "recipe.pretrain.snapshots=[2,7]", output_dir=run))
    last = run / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 7
    assert read_checkpoint(run / "snapshots" / "iter_0000007.ckpt")["global_step"] == 7
    final, snapshot = _weights(last), _weights(run / "snapshots" / "iter_0000007.ckpt")
    memory = objs["module"].net.state_dict()
    assert final.keys() == snapshot.keys() == memory.keys()
    for k in final:
        assert torch.equal(final[k], snapshot[k]) and torch.equal(final[k], memory[k]), k


def test_csv_rows_before_checkpoint_step() -> None:
    from cnnft.train import csv_rows_before

    text = ("epoch,step,train/loss,val/top1\n0,2,0.5,\n0,2,,0.1\n0,3,0.4,\n0,4,0.3,\n"
            "0,4,,0.2\n")
    assert csv_rows_before(text, 4) == "epoch,step,train/loss,val/top1\n0,2,0.5,\n0,2,,0.1\n0,3,0.4,\n"
    assert csv_rows_before(text, None) == text


def test_task_wrapper_logs_failure_to_the_job_log(tmp_path: Path) -> None:
    """cnnft-analyze's job log (Hydra's own file handler) gets a failure's error and traceback."""
    import logging

    from cnnft.task import task_wrapper
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["checkpoint=random"], tmp_path / "job", tmp_path, name="analyze")
    log_file = tmp_path / "job" / "analyze.log"
    log_file.parent.mkdir(parents=True)
    handler = logging.FileHandler(log_file)  # as Hydra attaches it for cnnft-analyze
    logging.getLogger().addHandler(handler)

    @task_wrapper()
    def job(cfg: object) -> None:
        raise ValueError("bad value 42")

    try:
        with pytest.raises(ValueError, match="bad value 42"):
            job(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = log_file.read_text()
    assert "job failed: ValueError: bad value 42" in text
    assert "Traceback (most recent call last)" in text and 'raise ValueError("bad value 42")' in text
    assert text.count("job failed") == 1
    assert not (tmp_path / "job" / ".hydra").exists()  # Hydra writes cnnft-analyze's records
