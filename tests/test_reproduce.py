"""cnnft-reproduce: override forwarding, stage skipping and resume, failures recorded (fast,
with stand-ins for training and analysis), and the real pipeline at the tiny setting (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import cnnft.analyze
import cnnft.train
from cnnft.errors import ConfigError
from cnnft.reproduce import MARKERS, discover_analyses, forward, reproduce
from tests.conftest import CONF, TINY_RUN
from tests.test_report import _ap_rows, _write


def repro_cfg(root: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("reproduce", overrides=[f"root={root}", "logger=csv", *overrides])


#: what `analyses: null` runs on each network (reproduce.yaml's exclude_analyses left out)
PER_NETWORK = [name for name in discover_analyses() if name not in ("snapshot_eval", "lowlevel_control")]

def test_overrides_go_to_the_configs_that_have_them() -> None:
    given = ["trainer.devices=2", "progress=false", "root=x", "data.voc_root=/v", "stages=[pretrain]",
             "+callbacks.crash.step=3", "debug=fast", "scale=paper", "hydra/launcher=slurm"]
    assert forward(given, "train") == ["trainer.devices=2", "data.voc_root=/v", "+callbacks.crash.step=3",
                                       "debug=fast", "scale=paper"]
    assert forward(given, "analyze") == ["progress=false", "data.voc_root=/v", "scale=paper"]
    assert forward(["freeze=fc", "seed=3"], "train", own=["freeze=all"]) == ["seed=3"]


def test_every_analysis_config_is_discovered() -> None:
    found = discover_analyses()
    assert {"probe_cls", "probe_gtbox"} <= set(found)
    assert found == sorted(p.stem for p in (CONF / "analyses").glob("*.yaml"))


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown \['pretrian'\]"):
        reproduce(repro_cfg(tmp_path, "stages=[pretrian]"))


class Fakes:
    """Stand-ins for cnnft.train.train and cnnft.analyze.analyze that record their configs and
    write the files the real ones write."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.train_calls: list[dict[str, Any]] = []
        self.analyze_calls: list[tuple[str, str]] = []
        self.fail = fail or set()

    def train(self, cfg: DictConfig) -> tuple[dict, dict]:
        out = Path(cfg.paths.output_dir)
        self.train_calls.append({"dir": out.name, "resume": cfg.resume, "pretrained": cfg.pretrained,
                                 "freeze": cfg.freeze.name, "steps": cfg.trainer.max_steps})
        if out.name in self.fail:
            raise RuntimeError(f"simulated crash in {out.name}")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"n": len(self.train_calls)}, out / "checkpoints" / "last.ckpt")
        if cfg.stage.name == "pretrain":
            (out / "snapshots").mkdir(exist_ok=True)
            for it in (10, 100, 200):
                torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)},
                           out / "snapshots" / f"iter_{it:07d}.ckpt")
        return {"val/top1": 0.5}, {}

    def analyze(self, cfg: DictConfig) -> dict:
        out = Path(cfg.paths.output_dir)
        name = next(iter(cfg.analyses))
        self.analyze_calls.append((out.name, name))
        if (out.name, name) in self.fail:
            raise ValueError(f"simulated {name} failure")
        if name in ("probe_cls", "probe_gtbox", "detection"):  # the analyses with AP rows
            _write(out, name, _ap_rows(["pool5"], ["unroll"], 0.4))
        return {}


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    f = Fakes()
    monkeypatch.setattr(cnnft.train, "train", f.train)
    monkeypatch.setattr(cnnft.analyze, "analyze", f.analyze)
    return f


NO_REPORT = "stages=[pretrain,finetune_all,finetune_fc,fifty_fifty,analyze]"


def test_stages_run_in_order_then_skip_then_resume(fakes: Fakes, tmp_path: Path) -> None:
    root = tmp_path / "root"
    status = reproduce(repro_cfg(root, NO_REPORT))
    assert all(v["status"] == "done" for v in status.values()), status
    calls = {c["dir"]: c for c in fakes.train_calls}
    assert list(calls) == ["pretrain", "finetune_all", "finetune_fc", "fifty_fifty"]
    assert all(c["resume"] == "auto" for c in calls.values())
    assert calls["finetune_all"]["pretrained"] == str(root / "pretrain" / "checkpoints" / "last.ckpt")
    assert (calls["finetune_all"]["freeze"], calls["finetune_fc"]["freeze"]) == ("all", "fc")
    # the 50-50 network: the snapshot at recipe.fifty_fifty.pretrain_iteration, fine-tuned that long
    assert calls["fifty_fifty"]["pretrained"] == str(root / "pretrain" / "snapshots" / "iter_0000200.ckpt")
    assert calls["fifty_fifty"]["steps"] == 100
    analysed = set(fakes.analyze_calls)
    for net in ("pretrained", "finetune_all", "finetune_fc", "fifty_fifty", "random"):
        assert {(net, "probe_cls"), (net, "probe_gtbox")} <= analysed
    assert {("iter_0000010", "probe_cls"), ("iter_0000100", "probe_cls")} <= analysed
    assert (root / "analyze" / "snapshots" / "iter_0000100" / "results" / "probe_cls.json").is_file()
    saved = json.loads((root / "reproduce.json").read_text())
    assert saved["scale"] == "demo" and saved["units"]["pretrain"]["status"] == "done"

    # a second call: everything is done already
    fakes.train_calls.clear()
    fakes.analyze_calls.clear()
    status = reproduce(repro_cfg(root, NO_REPORT))
    assert fakes.train_calls == [] and fakes.analyze_calls == []
    assert {v["status"] for v in status.values()} == {"skipped"}

    # finetune_fc killed mid-way: its checkpoint is there but no done marker -> it resumes
    # (resume=auto) and, its checkpoint rewritten, its analyses run again; nothing else does
    (root / "finetune_fc" / MARKERS / "finetune_fc.json").unlink()
    reproduce(repro_cfg(root, NO_REPORT))
    assert [c["dir"] for c in fakes.train_calls] == ["finetune_fc"]
    assert fakes.train_calls[0]["resume"] == "auto"
    assert sorted(fakes.analyze_calls) == [("finetune_fc", name) for name in PER_NETWORK]


def test_stages_select_and_analyses_are_config(fakes: Fakes, tmp_path: Path) -> None:
    reproduce(repro_cfg(tmp_path / "r", "stages=[pretrain,analyze]",
                        "networks.pretrained.analyses=[probe_cls]",
                        "~networks.finetune_all", "~networks.finetune_fc", "~networks.fifty_fifty",
                        "networks.random.analyses=[probe_gtbox]", "snapshots.iterations=[100]"))
    assert [c["dir"] for c in fakes.train_calls] == ["pretrain"]
    assert sorted(fakes.analyze_calls) == [("control", "lowlevel_control"), ("iter_0000100", "probe_cls"),
                                           ("pretrained", "probe_cls"), ("random", "probe_gtbox")]


def test_failures_are_recorded_and_the_rest_goes_on(fakes: Fakes, tmp_path: Path) -> None:
    fakes.fail = {"fifty_fifty", ("pretrained", "probe_gtbox")}
    root = tmp_path / "root"
    status = reproduce(repro_cfg(root))
    assert status["fifty_fifty"]["status"] == "failed"
    assert "simulated crash in fifty_fifty" in status["fifty_fifty"]["error"]
    assert status["analyze/fifty_fifty/probe_cls"]["status"] == "blocked"
    assert status["analyze/pretrained/probe_gtbox"]["status"] == "failed"
    assert status["analyze/pretrained/probe_cls"]["status"] == "done"
    assert status["analyze/finetune_fc/probe_gtbox"]["status"] == "done"
    failure = json.loads((root / "analyze" / "pretrained" / ".failed" / "probe_gtbox.json").read_text())
    assert "simulated probe_gtbox failure" in failure["error"]
    md = (root / "report" / "report.md").read_text()  # the report is still written, naming the failure
    assert "`analyze/pretrained/probe_gtbox`: ValueError: simulated probe_gtbox failure" in md
    assert "| fifty_fifty | failed |" in md
    # fixed: the next call runs only what failed or was blocked
    fakes.fail = set()
    fakes.train_calls.clear()
    fakes.analyze_calls.clear()
    status = reproduce(repro_cfg(root))
    assert [c["dir"] for c in fakes.train_calls] == ["fifty_fifty"]
    assert sorted(fakes.analyze_calls) == sorted([("fifty_fifty", name) for name in PER_NETWORK]
                                                 + [("pretrained", "probe_gtbox")])
    assert not (root / "analyze" / "pretrained" / ".failed" / "probe_gtbox.json").exists()


def test_pretrained_path_skips_pretraining(fakes: Fakes, tmp_path: Path) -> None:
    from cnnft.checkpoint import read_checkpoint
    from cnnft.models.caffenet import CaffeNet

    weights = tmp_path / "caffenet.pt"
    torch.save(CaffeNet(1000, width=0.125, input_size=67).state_dict(), weights)
    root = tmp_path / "root"
    status = reproduce(repro_cfg(root, NO_REPORT, f"pretrained={weights}"),
                       ["model.width=0.125", "model.input_size=67"])
    assert "pretrain" not in status and "fifty_fifty" not in status  # no snapshot to start 50-50 from
    assert {c["dir"]: c["pretrained"] for c in fakes.train_calls} == {
        "finetune_all": str(weights), "finetune_fc": str(weights)}
    wrapped = read_checkpoint(root / "pretrained" / "network.ckpt")
    assert wrapped["cnnft"]["arch"] == {"width": 0.125, "input_size": 67, "num_classes": 1000}
    assert ("pretrained", "probe_cls") in fakes.analyze_calls


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_with_a_killed_stage(data_dir: Path, tmp_path: Path) -> None:
    """The real stages at the tiny setting; pretraining killed at step 5 (after the step-3
    checkpoint) and resumed by the second call; then the report has our numbers."""
    root = tmp_path / "root"
    tiny = [*TINY_RUN, f"paths.data_dir={data_dir}", "progress=false", "probe.c_grid=[0.1,1.0]",
            "probe.folds=2", "batch_size=16", "recipe.fifty_fifty.pretrain_iteration=4",
            "recipe.fifty_fifty.finetune_steps=4", "layers=[pool1,pool5,relu7]"]
    crash = "train_overrides=['+callbacks.crash._target_=tests.crash.CrashAt','+callbacks.crash.step=5']"
    status = reproduce(repro_cfg(root, crash), tiny)
    assert status["pretrain"]["status"] == "failed" and status["finetune_all"]["status"] == "blocked"
    status = reproduce(repro_cfg(root), tiny)
    assert all(v["status"] in ("done", "skipped") for v in status.values()), status
    from cnnft.checkpoint import read_checkpoint

    assert read_checkpoint(root / "pretrain" / "checkpoints" / "last.ckpt")["global_step"] == 6
    md = (root / "report" / "report.md").read_text()
    for n in range(1, 9):
        assert (root / "report" / "tables" / f"table{n}.csv").is_file()
    assert (root / "report" / "figures" / "figure5_training.png").is_file()
    import re

    assert re.search(r"\| pool-5 \| \d+\.\d \(79\.1\) \| \d+\.\d \(82\.2\) \|", md)
    assert re.search(r"\| relu-7 \| \d+\.\d \(73\.6\) \|", md)  # Table 4 unroll
    assert "15K (ours 2)" in md or "15K (ours 4)" in md
