"""What pretraining adds, with its uncertainty: pretrained minus baseline mAP and a paired
bootstrap 95% interval over test images (``cnnft.bootstrap``), from the analyses' score files.

Rows: the pretrained network against the random network at pool5 and relu7 on image
classification (``probe_cls``), GT-box classification (``probe_gtbox``) and detection, and
against the strongest low-level control feature set (``lowlevel_control``, the set with the
highest mAP on that task) at pool5 on the two classification tasks. The criterion (issue 13):
the margin is at least ``MIN_MARGIN`` mAP points and the interval's lower bound is above 0.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnft.bootstrap import paired_bootstrap, resampled_map
from cnnft.errors import DataError
from cnnft.io import atomic_write, write_json
from cnnft.lowlevel import FEATURES
from cnnft.report.load import Results
from cnnft.report.paper import NETWORK_TITLE
from cnnft.scores import DetectionScores, ProbeScores, load_arrays

log = logging.getLogger(__name__)

#: the least margin (mAP points) that counts as a clear gain (issue 13)
MIN_MARGIN = 5.0
SAMPLES = 1000
SEED = 0
LEVEL = 0.95
CRITERION = (f"margin >= {MIN_MARGIN:g} mAP points and the lower bound of the bootstrap "
             f"{LEVEL:.0%} interval > 0")
#: (analysis, title, control task or None)
TASKS = (("probe_cls", "image classification", "cls"), ("probe_gtbox", "GT-box classification", "gtbox"),
         ("detection", "detection", None))
LAYERS = ("pool5", "relu7")
COLUMNS = ("task", "layer", "baseline", "pretrained_map", "baseline_map", "margin", "low", "high",
           "holds", "samples", "note")


def _load(res: Results, network: str, analysis: str, prefix: str = "") -> ProbeScores | DetectionScores:
    path = res.scores.get(network, {}).get(analysis)
    if path is None:
        raise LookupError(f"no {analysis} score file for {NETWORK_TITLE.get(network, network)}")
    arrays = load_arrays(path)
    if analysis == "detection":
        return DetectionScores.from_arrays(arrays, source=path)
    return ProbeScores.from_arrays(arrays, prefix, source=path)


def _same_items(a: ProbeScores | DetectionScores, b: ProbeScores | DetectionScores) -> str | None:
    """Why ``a`` and ``b`` cannot be paired, or None."""
    if a.image_ids != b.image_ids:
        return f"different test images ({len(a.image_ids)} vs {len(b.image_ids)})"
    if isinstance(a, ProbeScores) and isinstance(b, ProbeScores) and not (
            np.array_equal(a.image_index, b.image_index) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.ignore, b.ignore)):
        return "different test items or labels"
    if isinstance(a, DetectionScores) and isinstance(b, DetectionScores) \
            and not np.array_equal(a.positives, b.positives):
        return "different ground truth"
    return None


def _row(task: str, layer: str, baseline: str, a, key_a: str, b, key_b: str, *, samples: int,
         seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "layer": layer, "baseline": baseline}
    why = _same_items(a, b)
    if why:
        return {**row, "holds": None, "note": f"not paired: {why}"}
    m = paired_bootstrap(a.rankings(key_a), b.rankings(key_b), num_images=len(a.image_ids),
                         samples=samples, seed=seed, level=LEVEL)
    margin, low, high = 100 * m.margin, 100 * m.low, 100 * m.high
    note = f"{m.undefined} resample(s) left a class without a positive" if m.undefined else ""
    return {**row, "pretrained_map": 100 * m.map_a, "baseline_map": 100 * m.map_b, "margin": margin,
            "low": low, "high": high, "holds": bool(margin >= MIN_MARGIN and low > 0), "samples": samples,
            "note": note}


def margin_rows(res: Results, *, samples: int = SAMPLES, seed: int = SEED) -> list[dict[str, Any]]:
    """The rows of the module doc (mAP and margins in points); a row whose score files are
    missing or do not pair has ``holds`` None and says why in ``note``."""
    rows: list[dict[str, Any]] = []
    loaded: dict[tuple[str, ...], ProbeScores | DetectionScores] = {}

    def load(network: str, analysis: str, prefix: str = "") -> ProbeScores | DetectionScores:
        if (network, analysis, prefix) not in loaded:
            loaded[network, analysis, prefix] = _load(res, network, analysis, prefix)
        return loaded[network, analysis, prefix]

    for analysis, title, control_task in TASKS:
        comparisons = [(layer, NETWORK_TITLE["random"], "random") for layer in LAYERS]
        if control_task:
            comparisons.append(("pool5", f"{NETWORK_TITLE['control']}: strongest features", "control"))
        for layer, label, network in comparisons:  # label: replaced by the feature set found
            try:
                a = load("pretrained", analysis)
                key_a = key_b = f"{res.model_layer(layer)}/unroll"  # score files keep the model's names
                if network == "control":
                    b = load("control", "lowlevel_control", f"{control_task}/")
                    key_b = strongest(b)
                    label = f"{NETWORK_TITLE['control']}: {key_b} histograms"
                else:
                    b = load(network, analysis)
                rows.append(_row(title, layer, label, a, key_a, b, key_b, samples=samples, seed=seed))
            except (LookupError, DataError, ValueError) as e:
                rows.append({"task": title, "layer": layer, "baseline": label, "holds": None,
                             "note": str(e)})
    return rows


def strongest(control: ProbeScores) -> str:
    """The control's feature set with the highest test mAP (ties: the first of ``FEATURES``)."""
    ones = np.ones((1, len(control.image_ids)), dtype=np.int64)
    found = [f for f in FEATURES if f in control.scores]
    if not found:
        raise DataError(f"the low-level control's score file has none of the feature sets {list(FEATURES)}")
    return max(found, key=lambda f: float(resampled_map(control.rankings(f), ones).mean()))


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def margins_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the report's margin table."""
    header = ["task", "layer", "baseline", "alex-net", "baseline mAP", "margin",
              f"{LEVEL:.0%} interval", "criterion"]
    text = []
    for r in rows:
        interval = "n/a" if r.get("low") is None else f"[{r['low']:.1f}, {r['high']:.1f}]"
        verdict = {True: "**yes**", False: "**no**", None: "n/a"}[r["holds"]]
        note = f" ({r['note']})" if r.get("note") else ""
        text.append([r["task"], r["layer"], r["baseline"], _num(r.get("pretrained_map")),
                     _num(r.get("baseline_map")), _num(r.get("margin")) if r.get("margin") is None
                     else f"{r['margin']:+.1f}", interval, verdict + note])
    return header, text


def write_margins(rows: Sequence[dict[str, Any]], folder: Path, *, samples: int = SAMPLES,
                  seed: int = SEED) -> Path:
    """``tables/baseline_margins.json`` (settings + rows) and ``.csv`` (rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows([{k: r.get(k) for k in COLUMNS} for r in rows])
    atomic_write(folder / "baseline_margins.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    return write_json(folder / "baseline_margins.json", {
        "criterion": CRITERION, "min_margin_points": MIN_MARGIN, "level": LEVEL, "samples": samples,
        "seed": seed, "unit": "mAP points (VOC07 11-point AP x 100)", "resampled": "test images",
        "rows": [{k: r.get(k) for k in COLUMNS} for r in rows]})
