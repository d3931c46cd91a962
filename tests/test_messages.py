"""Help pages and messages (issue 14, items 8 and 10): each command's --help, what a missing or
bad value says, paper-scale pretraining without VOC, the filter_viz training curves from
cnnft-analyze, and Figure 5's layout."""

from __future__ import annotations

import csv
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import analyses.filter_viz as filter_viz
from cnnft.analyze import analyze
from cnnft.checkpoint import read_checkpoint
from cnnft.cli import check_group_choices, options
from cnnft.errors import CheckpointError, ConfigError
from cnnft.train import train
from tests.conftest import CONF, TINY_DATA, TINY_RUN, compose_cfg

COMMANDS = ("train", "analyze", "reproduce")
#: groups a help page may list that are not in its primary config's defaults
HYDRA_GROUPS = {"hydra/launcher"}


def _compose(name: str, overrides: list[str] = ()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(name, overrides=list(overrides), return_hydra_config=True)


def help_text(name: str) -> str:
    """``cnnft-<name> --help`` as Hydra renders it (``Hydra.get_help``: the template, resolved)."""
    cfg = _compose(name)
    HydraConfig.instance().set_config(cfg)
    return string.Template(cfg.hydra.help.template).substitute(
        FLAGS_HELP="", HYDRA_CONFIG_GROUPS="", APP_CONFIG_GROUPS="", CONFIG="")


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 1:end]


def accepted_groups(name: str) -> set[str]:
    """The config groups in ``conf/<name>.yaml``'s defaults list (what the command accepts)."""
    groups = set()
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))["defaults"]:
        if isinstance(entry, dict):
            groups |= {k.replace("optional ", "").strip() for k in entry if not k.startswith("override")}
    return groups - {"hydra", "local"}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_page(name: str) -> None:
    text = help_text(name)
    cmd = f"cnnft-{name}"
    assert text.startswith(f"{cmd}: ") and "powered by Hydra" not in text
    assert f"\nUsage: {cmd} " in text
    assert len(text.splitlines()) < 80  # Hydra's page was 160-215 lines
    examples = [line.strip() for line in _section(text, "Examples:") if line.startswith(f"  {cmd}")]
    assert 3 <= len(examples) <= 5
    for example in examples:  # each example composes (sweeps aside; placeholders are strings)
        overrides = example.replace("<run>", "RUN").split()[1:]
        if "-m" not in overrides:
            _compose(name, overrides)
    listed = {}
    for line in _section(text, "Config groups"):
        if m := re.match(r"^  ([\w/]+): (.*)$", line):
            listed[m.group(1)] = m.group(2)
    assert set(listed) - HYDRA_GROUPS == accepted_groups(name)
    for group, text_options in listed.items():
        if group not in HYDRA_GROUPS:
            assert text_options.startswith(", ".join(options(group)) + " (default: "), group
            _compose(name, [f"{group}={options(group)[0]}" if group not in ("analyses", "ablations")
                            else f"{group}=[{options(group)[0]}]"])  # accepted
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        if folder.name not in listed:  # not listed: rejected
            with pytest.raises(Exception, match=folder.name):
                _compose(name, [f"{folder.name}={options(folder.name)[0]}"])


def test_help_options_and_defaults() -> None:
    train_help, analyze_help = help_text("train"), help_text("analyze")
    assert "  freeze: all, fc, upto_conv1, upto_conv2, upto_conv3, upto_conv4 (default: all)" in train_help
    assert "(default: [probe_cls])" in analyze_help and "debug:" not in analyze_help
    assert "freeze:" not in help_text("reproduce")
    reproduce_help = help_text("reproduce")
    for stage in ("pretrain", "finetune_all", "finetune_fc", "fifty_fifty", "analyze", "report"):
        assert stage in reproduce_help


def test_cnnft_analyze_help_is_the_page() -> None:
    script = Path(sys.executable).parent / "cnnft-analyze"  # the console script
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cnnft-analyze: ") and "Usage: cnnft-analyze checkpoint=" in out.stdout
    assert "== Config ==" not in out.stdout and "stage:" not in out.stdout


# ---------------------------------------------------------------- messages


def test_unknown_analysis_lists_the_options() -> None:
    with pytest.raises(ConfigError, match=r"analyses=\[probe_cls,nosuch\]: no analyses option 'nosuch'; "
                                          r"available options in 'analyses': detection, .*filter_viz"):
        check_group_choices(["analyses=[probe_cls,nosuch]"])
    with pytest.raises(ConfigError, match="'nope'.*spatial_max"):
        check_group_choices(["-m", "ablations=[unroll],[nope]"])
    check_group_choices(["analyses=[probe_cls,filter_viz]", "ablations=[]", "freeze=fc", "stages=[x]"])
    check_group_choices(["--config-dir", "mine", "analyses=[my_analysis]"])  # Hydra checks those
    script = Path(sys.executable).parent / "cnnft-train"
    out = subprocess.run([str(script), "analyses=[nosuch]"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "no analyses option 'nosuch'; available options in 'analyses': detection" in out.stderr


def test_analyze_without_checkpoint_says_what_to_pass(tmp_path: Path) -> None:
    cfg = compose_cfg(["logger=csv"], tmp_path / "out", tmp_path / "data", name="analyze")
    with pytest.raises(ConfigError, match=r"checkpoint is missing: pass checkpoint=PATH with a "
                                          r"checkpoint file .*a directory of snapshots .*checkpoint=random"):
        analyze(cfg)
    assert not (tmp_path / "data").exists()  # refused before the demo data is written


def test_paper_scale_names_the_data_roots(tmp_path: Path) -> None:
    cfg = compose_cfg(["scale=paper", "logger=csv"], tmp_path / "out", tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.imagenet_root is missing: pass "
                                          r"data\.imagenet_root=/path/to/ILSVRC2012"):
        train(cfg)
    cfg = compose_cfg(["scale=paper", "logger=csv", "stage=finetune", "pretrained=x.ckpt"],
                      tmp_path / "out", tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.voc_root is missing: pass data\.voc_root=/path/to/VOC"):
        train(cfg)
    cfg = compose_cfg(["scale=paper", "logger=csv", "data.imagenet_root=/x", "analyses=[probe_cls]"],
                      tmp_path / "out", tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.voc_root is missing"):  # the probes read VOC
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_paper_scale_pretraining_needs_no_voc(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny = [o for o in TINY_RUN if o not in TINY_DATA]  # scale=paper has no demo data spec
    cfg = compose_cfg([*tiny, "scale=paper", f"data.imagenet_root={data_dir / 'demo' / 'imagenet'}",
                       "data.num_workers=0", "recipe.pretrain.max_steps=2", "recipe.pretrain.snapshots=[]"],
                      out, data_dir)
    train(cfg)
    saved = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2
    assert saved["cnnft"]["config"]["data"]["voc_root"] == "???"  # recorded as not given
    assert "voc_root: ???" in (out / "config.yaml").read_text()


def test_unreadable_checkpoint_says_why(tmp_path: Path) -> None:
    text = tmp_path / "weights.txt"
    text.write_text("epoch 1 loss 2.3\n")
    reason = r"not a PyTorch checkpoint: a text file \(it starts 'epoch 1 loss 2\.3'\)"
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*weights\.txt: " + reason) as e:
        read_checkpoint(text)
    assert "101" not in str(e.value)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: the file is empty"):
        read_checkpoint(empty)
    whole = tmp_path / "whole.ckpt"
    torch.save({"w": torch.zeros(4)}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: a damaged PyTorch archive"):
        read_checkpoint(cut)


# ---------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny pretraining run (6 steps, validation at 3 and 6)."""
    out = tmp_path_factory.mktemp("curves") / "run"
    train(compose_cfg(TINY_RUN, out, data_dir))
    return out


def _analyze_cfg(checkpoint: str, out: Path, data_dir: Path):
    return compose_cfg([*TINY_DATA, "model.width=0.125", "model.input_size=67", "model.resize=76",
                        "model.context_pad=5", "data.num_workers=0", "logger=csv", "progress=false",
                        f"checkpoint={checkpoint}", "analyses=[filter_viz]"], out, data_dir, name="analyze")


def test_filter_viz_curves_from_the_checkpoints_run(trained_run: Path, data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    drawn = []
    plot = filter_viz.plot_training_curves
    monkeypatch.setattr(filter_viz, "plot_training_curves",
                        lambda curves, marks=(): drawn.append(curves) or plot(curves, marks))
    with (trained_run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    loss_steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    top1_steps = sorted({int(r["step"]) for r in rows if r.get("val/top1")})
    assert loss_steps and top1_steps
    for ckpt in ("checkpoints/last.ckpt", "snapshots"):
        out = tmp_path / ckpt.split("/")[0]
        analyze(_analyze_cfg(str(trained_run / ckpt), out, data_dir))
        assert (out / "figures" / "training_curves.png").stat().st_size > 1000
        curves = drawn.pop()
        assert curves["train/loss"][0].tolist() == loss_steps  # the training run's curves
        assert curves["val/top1"][0].tolist() == top1_steps
    # a random network has no training run: no figure (an earlier one is removed), a log line
    out = tmp_path / "random"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "training_curves.png").write_bytes(b"stale")
    with caplog.at_level("INFO", logger="analyses.filter_viz"):
        analyze(_analyze_cfg("random", out, data_dir))
    assert not drawn and not (out / "figures" / "training_curves.png").exists()
    assert re.search(r"filter_viz: .*metrics\.csv has no train/loss or val/top1 values; "
                     r".*training_curves\.png left out", caplog.text)


def _overlaps(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(ax.get_title() or "?", ax.get_tightbbox(renderer)) for ax in fig.axes]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.overlaps(box_b)]


def test_figure5_panels_do_not_overlap(tmp_path: Path) -> None:
    from cnnft.report.figures import figure5
    from cnnft.report.load import load_results
    from tests.test_report import fake_root

    fig = figure5(load_results([fake_root(tmp_path / "root")]))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["conv1 at iteration 10", "conv1 at iteration 30", "conv1 at iteration 450",
                      "training loss", "validation top-1 (ImageNet layout)"]
    assert _overlaps(fig) == []
    assert all(len(ax.lines) == 1 for ax in fig.axes[3:])  # both curves drawn
