"""The shared threshold kernels (cnnft.thresholds) and the rule that plugins import only public names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cnnft.errors import ConfigError
from cnnft.thresholds import (
    MODES,
    check_threshold_mode,
    rank_counts,
    threshold_counts,
    threshold_values,
    value_counts,
)

ROOT = Path(__file__).resolve().parents[1]


def test_counts_by_hand() -> None:
    at = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 2, 1])
    # rank, T=5: one sample per threshold, descending, ties by sample order: 1, 3, 4, 2, 0
    assert rank_counts(at, labels, 5, 3)[0].argmax(-1).tolist() == [1, 2, 1, 0, 0]
    assert rank_counts(at, labels, 5, 3).sum().item() == 5
    # value, T=3 over [0, 3]: >= 2 keeps {3, 3, 2}; >= 1 adds {1}; >= 0 adds {0}
    assert value_counts(at, labels, 3, 3)[0].tolist() == [[0, 2, 1], [1, 0, 0], [1, 0, 0]]
    assert threshold_counts("rank") is rank_counts and threshold_counts("value") is value_counts
    assert threshold_values(at, 5, "rank")[0].tolist() == [3.0, 3.0, 2.0, 1.0, 0.0]
    assert threshold_values(at, 3, "value")[0].tolist() == [2.0, 1.0, 0.0]


def test_threshold_mode_checked_in_one_place() -> None:
    assert MODES == ("rank", "value") and check_threshold_mode("rank") == "rank"
    with pytest.raises(ConfigError, match=r"^threshold_mode='quantile'; expected one of \['rank', 'value'\]"):
        threshold_counts("quantile")
    with pytest.raises(ConfigError, match=r"^unit_selectivity threshold_mode='q'; expected one of"):
        check_threshold_mode("q", "unit_selectivity threshold_mode")
    sources = [p.read_text() for p in [*ROOT.glob("cnnft/**/*.py"), *ROOT.glob("analyses/*.py")]]
    checks = [s.count("not in MODES") for s in sources if '("rank", "value")' in s or "threshold_mode" in s]
    assert sum(checks) == 1


def _private_imports(path: Path) -> list[str]:
    """``from X import _name`` of another module (the module's own package excluded)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_plugins_and_package_import_only_public_names() -> None:
    bad = {str(p.relative_to(ROOT)): names for p in [*ROOT.glob("cnnft/**/*.py"), *ROOT.glob("analyses/*.py")]
           if (names := _private_imports(p))}
    assert bad == {}
