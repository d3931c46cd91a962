"""Config groups: the stages share conf/module, cnnft-analyze needs no dummy stage, and the
random baseline network's classes come from the scale."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cnnft.analyze import load_network
from tests.conftest import CONF, compose_cfg


def _choices(name: str, overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    return dict(cfg.hydra.runtime.choices)


def test_stages_share_the_module_group(tmp_path: Path) -> None:
    assert _choices("train", ["stage=finetune"])["module"] == "caffenet"
    modules = {}
    for stage in ("pretrain", "finetune"):
        cfg = compose_cfg([f"stage={stage}", "scale=paper"], tmp_path, tmp_path)
        modules[stage] = OmegaConf.to_container(cfg.module, resolve=True)
    pre, fine = modules["pretrain"], modules["finetune"]
    assert pre["optim"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "lr_step": 100000,
                            "gamma": 0.1, "lr_mult": {}}
    assert fine["optim"] == {**pre["optim"], "lr": 0.001, "lr_step": 20000, "lr_mult": {"fc8": 10}}
    assert {k: v for k, v in pre.items() if k != "optim"} == {k: v for k, v in fine.items() if k != "optim"}
    assert pre["_target_"] == "cnnft.module.CaffeNetModule" and pre["net"]["width"] == 1.0


def test_analyze_needs_no_stage(tmp_path: Path) -> None:
    cfg = compose_cfg(["checkpoint=random", "logger=wandb"], tmp_path, tmp_path, name="analyze")
    assert "stage" not in cfg
    assert (cfg.logger.group, cfg.logger.name) == ("analyze-demo", "analyze-0")
    train = compose_cfg(["stage=finetune", "logger=wandb"], tmp_path, tmp_path)
    assert train.logger.group == "finetune-demo"


def test_random_network_classes_come_from_the_scale(tmp_path: Path) -> None:
    over = ["checkpoint=random", "model.width=0.125", "model.input_size=67"]
    paper = compose_cfg([*over, "scale=paper"], tmp_path, tmp_path, name="analyze")
    assert paper.scale.random_classes == 1000
    cfg = compose_cfg(over, tmp_path, tmp_path, name="analyze")
    net, _, digest, step = load_network("random", cfg)
    assert net.fc8.out_features == 21 and digest.startswith("random:") and step == 0
    net, *_ = load_network("random", compose_cfg([*over, "scale.random_classes=7"], tmp_path, tmp_path,
                                                 name="analyze"))
    assert net.fc8.out_features == 7
