"""The contract every analysis plugin keeps, checked for each ``Analysis`` subclass found in the
``analyses`` package (a new plugin is tested without editing this file):

* it builds from ``conf/analyses/<name>.yaml`` the way ``cnnft-train`` builds callbacks, and its
  state survives a ``torch.save`` / ``weights_only`` load round trip;
* it runs as a training callback on the tiny demo net and writes ``results/<name>.json``;
* its state is saved in the checkpoint, handed back on ``resume=auto``, and it runs again after.

Analyses sharing the same ``contract_overrides`` share one tiny training run (2 steps, then
resumed to 4), built on first use.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import io
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import analyses
from cnnft.analysis import Analysis
from cnnft.checkpoint import read_checkpoint
from cnnft.train import build_callbacks, train
from tests.conftest import CONF, TINY_RUN, compose_cfg


def discover() -> dict[str, type[Analysis]]:
    """Every ``Analysis`` subclass defined (not imported) in a module of ``analyses`` that sets
    its own ``name``, keyed by that name."""
    found: dict[str, type[Analysis]] = {}
    for info in pkgutil.iter_modules(analyses.__path__):
        module = importlib.import_module(f"{analyses.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, Analysis) and cls.__module__ == module.__name__ and "name" in vars(cls)
                    and not inspect.isabstract(cls)):
                assert cls.name not in found, f"two analyses named {cls.name!r}: {found[cls.name]}, {cls}"
                found[cls.name] = cls
    return found


ANALYSES = discover()
NAMES = sorted(ANALYSES)

FIRST_STEPS, RESUMED_STEPS = 2, 4
#: The tiny run, made cheaper for the probes; a checkpoint and a snapshot at each part's end.
CONTRACT_RUN = [*TINY_RUN, "layers=[pool5]", "probe.c_grid=[1.0]", "probe.folds=2",
                f"checkpoint_every={FIRST_STEPS}", f"snapshots=[{FIRST_STEPS},{RESUMED_STEPS}]"]


def overrides_of(cls: type[Analysis], pretrained: Path | str) -> list[str]:
    return [o.format(pretrained=pretrained) for o in cls.contract_overrides]


@dataclass
class ContractRun:
    """One tiny run with a group of analyses: results after part one, the checkpointed states,
    the states handed back on resume, and the analysis objects after part two."""

    out: Path
    first_results: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)
    loaded: dict[str, Any] = field(default_factory=dict)
    resumed: dict[str, Analysis] = field(default_factory=dict)


def _results(out: Path, name: str) -> Any:
    path = out / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _instances(trainer: Any) -> dict[str, Analysis]:
    return {cb.name: cb for cb in trainer.callbacks if isinstance(cb, Analysis)}


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """``contract_run(cls)`` -> the ContractRun of cls's group (built on first use, then cached)."""
    runs: dict[tuple[str, ...], ContractRun] = {}
    pretrained: list[Path] = []

    def pretrained_ckpt() -> Path:
        if not pretrained:
            out = tmp_path_factory.mktemp("contract_pretrain") / "run"
            train(compose_cfg([*TINY_RUN, "recipe.pretrain.max_steps=2"], out, data_dir))
            pretrained.append(out / "checkpoints" / "last.ckpt")
        return pretrained[0]

    def get(cls: type[Analysis]) -> ContractRun:
        key = tuple(cls.contract_overrides)
        if key in runs:
            return runs[key]
        group = [c for c in ANALYSES.values() if tuple(c.contract_overrides) == key]
        extra = overrides_of(cls, pretrained_ckpt() if any("{pretrained}" in o for o in key) else "")
        out = tmp_path_factory.mktemp("contract") / "run"
        names = ",".join(c.name for c in group)
        base = [*CONTRACT_RUN, f"analyses=[{names}]", *extra]
        run = ContractRun(out)
        _, objs = train(compose_cfg([*base, f"trainer.max_steps={FIRST_STEPS}"], out, data_dir))
        run.first_results = {c.name: _results(out, c.name) for c in group}
        states = read_checkpoint(out / "checkpoints" / "last.ckpt").get("callbacks", {})
        keys = {name: cb.state_key for name, cb in _instances(objs["trainer"]).items()}
        run.saved = {name: states.get(k) for name, k in keys.items()}
        with pytest.MonkeyPatch.context() as mp:
            for c in group:
                original = c.load_state_dict

                def spy(self: Analysis, state: dict[str, Any], original: Any = original) -> None:
                    run.loaded[self.name] = copy.deepcopy(state)
                    original(self, state)

                mp.setattr(c, "load_state_dict", spy)
            _, objs = train(compose_cfg([*base, f"trainer.max_steps={RESUMED_STEPS}", "resume=auto"],
                                        out, data_dir))
        run.resumed = _instances(objs["trainer"])
        runs[key] = run
        return run

    return get


def test_the_plugins_are_found() -> None:
    assert {"probe_cls", "probe_gtbox", "snapshot_eval", "filter_viz"} <= set(ANALYSES)


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_its_yaml(name: str, data_dir: Path, tmp_path: Path) -> None:
    cls = ANALYSES[name]
    yaml = CONF / "analyses" / f"{name}.yaml"
    assert yaml.is_file(), f"{cls.__qualname__} has no config {yaml}"
    assert yaml.read_text().startswith(f"# @package analyses.{name}\n")
    cfg = compose_cfg([*CONTRACT_RUN, f"analyses=[{name}]", *overrides_of(cls, tmp_path / "x.ckpt")],
                      tmp_path / "run", data_dir)
    built = [cb for cb in build_callbacks(cfg) if isinstance(cb, Analysis)]
    assert [type(cb) for cb in built] == [cls] and built[0].name == name
    buf = io.BytesIO()
    torch.save(built[0].state_dict(), buf)  # plain values: loadable with weights_only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = [cb for cb in build_callbacks(cfg) if isinstance(cb, Analysis)][0]
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


@pytest.mark.parametrize("name", NAMES)
def test_runs_as_training_callback(name: str, contract_run) -> None:
    run = contract_run(ANALYSES[name])
    payload = run.first_results[name]
    assert payload is not None, f"{name} wrote no results/{name}.json in a {FIRST_STEPS}-step run"
    assert payload["analysis"] == name and payload["step"] == FIRST_STEPS
    assert payload["rows"] and all(isinstance(r, dict) for r in payload["rows"])
    assert (run.out / "results" / f"{name}.csv").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_survives_save_and_resume(name: str, contract_run) -> None:
    run = contract_run(ANALYSES[name])
    saved = run.saved[name]
    assert saved is not None, f"{name}'s state is not in checkpoints/last.ckpt"
    assert run.loaded[name] == saved, "resume did not hand the checkpointed state back"
    after = run.resumed[name].state_dict()
    assert after["runs"] >= saved["runs"] + 1 and after["last_step"] == RESUMED_STEPS
    assert _results(run.out, name)["step"] == RESUMED_STEPS
