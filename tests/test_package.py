"""Packaging: the wheel's package list covers the source tree, conf/ ships as cnnft.conf, and an
installed package finds its configs inside itself (the wheel itself: .ci/wheel_check.sh)."""

import tomllib
from pathlib import Path

import cnnft.train
from cnnft.train import conf_dir

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_is_listed_and_conf_ships_inside_cnnft():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("cnnft", "analyses") for p in (ROOT / top).rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"cnnft.conf"}
    assert setup["package-dir"] == {"cnnft.conf": "conf"}
    assert setup["package-data"]["cnnft.conf"] == ["**/*.yaml"]


def test_conf_dir_beside_the_source_tree_or_inside_the_package(tmp_path, monkeypatch):
    assert conf_dir() == str(ROOT / "conf") == cnnft.train.CONF_DIR
    package = tmp_path / "site-packages" / "cnnft"
    (package / "conf").mkdir(parents=True)
    monkeypatch.setattr(cnnft.train, "__file__", str(package / "train.py"))
    assert conf_dir() == str(tmp_path / "site-packages" / "conf")   # no configs inside: beside it
    (package / "conf" / "train.yaml").write_text("seed: 0\n")
    assert conf_dir() == str(package / "conf")                      # as installed from the wheel
