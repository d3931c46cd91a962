"""cnnft-reproduce: override forwarding, stage skipping and resume, failures recorded (fast,
with stand-ins for training and analysis), and the real pipeline at the tiny setting (slow)."""

from __future__ import annotations

import json
import os
import shutil
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
from cnnft.reproduce import discover_analyses, forward, reproduce
from cnnft.reproduce_state import MARKERS
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


def test_job_configs_resolve_without_hydra_runtime(tmp_path: Path) -> None:
    """No conf/ value reads Hydra's runtime: each command's config composed by the compose API
    resolves whole (cnnft-reproduce's too: its logger names run_name), the run directory an
    ordinary key."""
    from omegaconf import OmegaConf

    from cnnft.task import compose_job

    assert not [p for p in CONF.rglob("*.yaml") if "${hydra:" in p.read_text() and "hydra" not in p.parts]
    for name in ("train", "analyze", "reproduce"):
        GlobalHydra.instance().clear()
        cfg = compose_job(name, ["logger=wandb"], tmp_path / "a b=[c]")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["paths"]["output_dir"] == str(tmp_path / "a b=[c]")
        assert resolved["logger"]["save_dir"] == str(tmp_path / "a b=[c]")
    assert resolved["logger"]["name"] == "reproduce-demo"
    assert OmegaConf.to_container(repro_cfg(tmp_path / "r"), resolve=True)["paths"]["output_dir"] == str(
        tmp_path / "r")


def test_reproduce_cfg_job_resolve_cli(tmp_path: Path) -> None:
    """``cnnft-reproduce --cfg job --resolve`` prints the resolved config."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cnnft.reproduce", "--cfg", "job", "--resolve",
                          f"root={tmp_path}"], capture_output=True, text=True, timeout=300,
                         cwd=CONF.parent, env={**os.environ, "PYTHONPATH": str(CONF.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: reproduce-demo" in out.stdout and f"save_dir: {tmp_path}" in out.stdout


def test_paper_scale_without_data_roots_is_refused_up_front(fakes: Fakes, tmp_path: Path) -> None:
    root = tmp_path / "root"

    def call(*overrides: str) -> dict:  # as the command line does: the config and its overrides
        return reproduce(repro_cfg(root, *overrides), list(overrides))

    with pytest.raises(ConfigError, match=r"^data\.imagenet_root is missing: pass data\.imagenet_root=/path/"
                                          r".*; data\.voc_root is missing: pass data\.voc_root=/path/"):
        call("scale=paper")
    with pytest.raises(ConfigError, match=r"^data\.voc_root is missing"):  # analyses need no ImageNet
        call("scale=paper", "stages=[analyze]")
    assert not root.exists() and fakes.train_calls == [] and fakes.analyze_calls == []
    call("scale=paper", "stages=[pretrain]", "data.imagenet_root=/x")  # pretraining needs no VOC
    assert [c["dir"] for c in fakes.train_calls] == ["pretrain"]


def test_paper_scale_without_data_roots_cli_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "root"
    out = subprocess.run([sys.executable, "-m", "cnnft.reproduce", "scale=paper", f"root={root}"],
                         capture_output=True, text=True, timeout=300, cwd=CONF.parent,
                         env={**os.environ, "PYTHONPATH": str(CONF.parent)})
    assert out.returncode == 1
    assert "data.imagenet_root is missing" in out.stderr and "data.voc_root is missing" in out.stderr
    assert [p for p in root.rglob("*")] == []  # Hydra makes the directory; nothing is written in it


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
                                 "freeze": cfg.freeze.name, "steps": cfg.trainer.max_steps,
                                 "format": cfg.pretrained_format})
        if out.name in self.fail:
            raise RuntimeError(f"simulated crash in {out.name}")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"conv1.weight": torch.full((4, 3, 3, 3), float(len(self.train_calls)))},  # new weights
                   out / "checkpoints" / "last.ckpt")
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
    # the wrapped network holds the given weights: both files have one weights digest
    wrap = json.loads((root / "pretrained" / MARKERS / "wrap.json").read_text())
    analysed = json.loads((root / "analyze" / "pretrained" / MARKERS / "probe_cls.json").read_text())
    assert wrap["weights"] == analysed["weights"] and len(wrap["weights"]) == 64


def test_caffe_weights_are_converted_for_analysis_and_fine_tuning(fakes: Fakes, tmp_path: Path) -> None:
    from cnnft.checkpoint import read_checkpoint
    from cnnft.models.caffenet import CaffeNet

    caffe = CaffeNet(1000, width=0.125, input_size=67).state_dict()
    weights = tmp_path / "from_caffe.pt"
    torch.save(caffe, weights)
    root = tmp_path / "root"
    reproduce(repro_cfg(root, NO_REPORT, f"pretrained={weights}", "pretrained_format=caffe"),
              ["model.width=0.125", "model.input_size=67", "pretrained_format=caffe"])
    assert {c["dir"]: c["format"] for c in fakes.train_calls} == {"finetune_all": "caffe",
                                                                  "finetune_fc": "caffe"}
    wrapped = read_checkpoint(root / "pretrained" / "network.ckpt")["state_dict"]
    assert torch.equal(wrapped["net.conv1.weight"], caffe["conv1.weight"].flip(1))  # BGR -> RGB
    assert torch.equal(wrapped["net.fc6.weight"], caffe["fc6.weight"])


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


# ---------------------------------------------------------------- markers keyed by content

#: a small pipeline: every training stage, each kind of network and two snapshots (12 units)
SMALL = [NO_REPORT, "networks.pretrained.analyses=[probe_cls,probe_gtbox]",
         *(f"networks.{n}.analyses=[probe_cls]"
           for n in ("finetune_all", "finetune_fc", "fifty_fifty", "random")),
         "snapshots.iterations=[10,100]", "~networks.control"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished reproduce root of the SMALL pipeline (built once; tests work on copies)."""
    root = tmp_path_factory.mktemp("finished") / "root"
    f = Fakes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cnnft.train, "train", f.train)
        mp.setattr(cnnft.analyze, "analyze", f.analyze)
        status = reproduce(repro_cfg(root, *SMALL))
    assert len(status) == 12 and {v["status"] for v in status.values()} == {"done"}, status
    return root


def copy_root(src: Path, dst: Path) -> Path:
    """``cp -a``: contents, sizes and mtimes kept."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The checkpoint files cnnft-reproduce opens to hash their weights."""
    import cnnft.reproduce_state

    seen: list[str] = []
    real = cnnft.reproduce_state.read_checkpoint

    def counting(path: Any) -> dict:
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(cnnft.reproduce_state, "read_checkpoint", counting)
    return seen


def ran(fakes: Fakes) -> list[Any]:
    return [c["dir"] for c in fakes.train_calls] + sorted(fakes.analyze_calls)


def test_a_copied_root_runs_nothing(fakes: Fakes, reads: list[str], finished: Path, tmp_path: Path) -> None:
    copy = copy_root(finished, tmp_path / "elsewhere" / "copy")
    status = reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [] and {v["status"] for v in status.values()} == {"skipped"}
    assert reads == []  # sizes and mtimes kept: no checkpoint is hashed again


def test_a_respelled_root_runs_nothing(fakes: Fakes, finished: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copy_root(finished, tmp_path / "copy")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    status = reproduce(repro_cfg(Path("..") / "copy", *SMALL))  # relative; built absolute
    assert ran(fakes) == [] and {v["status"] for v in status.values()} == {"skipped"}


def test_touched_checkpoints_run_nothing(fakes: Fakes, reads: list[str], finished: Path,
                                         tmp_path: Path) -> None:
    copy = copy_root(finished, tmp_path / "copy")
    checkpoints = sorted(copy.rglob("*.ckpt"))
    assert len(checkpoints) == 7  # four last.ckpt, three snapshots (10, 100 and the 50-50 network's 200)
    for path in checkpoints:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**10))
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == []
    assert sorted(reads) == sorted(map(str, checkpoints))  # each hashed once: its stamp changed
    reads.clear()
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [] and reads == []  # and remembered with its new stamp


def test_a_changed_checkpoint_reruns_exactly_its_units(fakes: Fakes, finished: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    copy = copy_root(finished, tmp_path / "copy")  # moved and changed: only the change counts
    def change(path: str, value: float) -> None:
        torch.save({"conv1.weight": torch.full((4, 3, 3, 3), value)}, copy / path)

    change("finetune_fc/checkpoints/last.ckpt", -1.0)
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [("finetune_fc", "probe_cls")]
    fakes.analyze_calls.clear()
    change("pretrain/snapshots/iter_0000010.ckpt", -2.0)
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [("iter_0000010", "probe_cls")]
    # the pretrained network: its analyses rerun; the stages fine-tuned from it are kept, with a warning
    fakes.analyze_calls.clear()
    change("pretrain/checkpoints/last.ckpt", -3.0)
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [("pretrained", "probe_cls"), ("pretrained", "probe_gtbox")]
    assert "finetune_all was trained from other weights than" in caplog.text
    # a new override changes the analyses' config: they rerun; a logger change does not
    fakes.analyze_calls.clear()
    reproduce(repro_cfg(copy, *SMALL, "logger=tensorboard"))
    assert ran(fakes) == []
    reproduce(repro_cfg(copy, *SMALL), ["probe.folds=2"])
    assert len(fakes.analyze_calls) == 8 and fakes.train_calls == []


def test_old_markers_are_adopted_when_their_file_is_unchanged(fakes: Fakes, finished: Path,
                                                              tmp_path: Path) -> None:
    from cnnft.reproduce_state import file_stamp

    copy = copy_root(finished, tmp_path / "copy")
    folder = copy / "analyze" / "finetune_fc" / MARKERS
    spec = str(copy / "finetune_fc" / "checkpoints" / "last.ckpt")
    old = {"unit": "probe_cls", "finished": "2026-01-01T00:00:00", "stamp": file_stamp(spec),
           "checkpoint": spec, "wall_s": 3.0}
    (folder / "probe_cls.json").write_text(json.dumps(old))
    (copy / "analyze" / "random" / MARKERS / "probe_cls.json").write_text(
        json.dumps({**old, "stamp": "an old stamp of another file"}))
    reproduce(repro_cfg(copy, *SMALL))
    assert ran(fakes) == [("random", "probe_cls")]  # stamp of the file as it is: adopted
    adopted = json.loads((folder / "probe_cls.json").read_text())
    assert adopted["adopted"] == "2026-01-01T00:00:00" and adopted["wall_s"] == 3.0 and "stamp" not in adopted
    new = json.loads((finished / "analyze" / "finetune_fc" / MARKERS / "probe_cls.json").read_text())
    assert {k: adopted[k] for k in ("weights", "config", "inputs")} == {
        k: new[k] for k in ("weights", "config", "inputs")}


# ---------------------------------------------------------------- reproduce.json keeps history


def test_reproduce_json_keeps_every_call_and_unit(fakes: Fakes, tmp_path: Path) -> None:
    root = tmp_path / "root"
    nets = ["~networks.finetune_all", "~networks.finetune_fc", "~networks.fifty_fifty", "~networks.control",
            "networks.pretrained.analyses=[probe_cls]", "networks.random.analyses=[probe_cls]",
            "snapshots.iterations=[100]"]
    reproduce(repro_cfg(root, "stages=[pretrain]", *nets), ["seed=3"])
    first = json.loads((root / "reproduce.json").read_text())
    reproduce(repro_cfg(root, "stages=[analyze,report]", *nets))
    saved = json.loads((root / "reproduce.json").read_text())
    assert [(c["stages"], c["overrides"], c["status"]) for c in saved["calls"]] == [
        (["pretrain"], ["seed=3"], "ok"), (["analyze", "report"], [], "ok")]
    assert saved["started"] == first["calls"][0]["started"] and saved["calls"][0]["commit"]
    assert saved["units"]["pretrain"] == {**first["units"]["pretrain"], "call": 1}
    assert saved["units"]["pretrain"]["status"] == "done"
    assert {k: v["call"] for k, v in saved["units"].items()} == {
        "pretrain": 1, "analyze/pretrained/probe_cls": 2, "analyze/random/probe_cls": 2,
        "analyze/snapshots/iter_0000100/probe_cls": 2, "report": 2}
    md = (root / "report" / "report.md").read_text()
    wall = saved["units"]["pretrain"]["wall_s"]
    assert f"| pretrain | done | {wall:.0f} | 1 |" in md  # the training time is still in the Stages table
    assert "| 1 | " in md and "| pretrain | seed=3 |" in md and "| analyze report | none |" in md
    assert "call 1: seed=3; call 2: none" in md
