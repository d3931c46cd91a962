"""The paper's Tables 1-8 in the paper's layout, each cell "ours (paper)".

Ours are mean/per-class AP in percent (``ap * 100``, one decimal) from the loaded results, or
filter counts (Table 6). A cell without our number reads ``n/a (paper)``; ``-`` marks a cell
the paper leaves empty. Each table records which (analysis, network) results it reads, so the
report can list what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnnft.report.figures import unit_count_task
from cnnft.report.load import Results
from cnnft.report.paper import (
    CLASS_SHORT,
    LAYERS,
    PAPER_LAYER,
    PAPER_LAYER_CONV,
    PAPER_PRETRAIN_ITERATIONS,
    iteration_of,
    paper_tables,
)

Number = float | None


@dataclass
class Table:
    """A table: a row label column, then cells (ours, paper)."""

    key: str
    title: str
    corner: str
    columns: list[str]
    rows: list[tuple[str, list[tuple[Number, Number]]]]
    needs: set[tuple[str, str]] = field(default_factory=set)
    note: str = ""
    digits: int = 1

    def fmt(self, value: Number, missing: str) -> str:
        return missing if value is None else f"{value:.{self.digits}f}"

    def cell(self, ours: Number, paper: Number) -> str:
        return f"{self.fmt(ours, 'n/a')} ({self.fmt(paper, '-')})"

    def text_rows(self) -> list[list[str]]:
        return [[label, *(self.cell(o, p) for o, p in cells)] for label, cells in self.rows]

    def filled(self) -> int:
        """How many cells carry our number."""
        return sum(o is not None for _, cells in self.rows for o, _ in cells)


def _per_class_row(res: Results, analysis: str, network: str, layer: str, ablation: str,
                   paper: dict[str, Any] | None) -> list[tuple[Number, Number]]:
    classes = list(CLASS_SHORT)
    paper = paper or {}
    per_class = paper.get("per_class") or {}
    cells = [(res.ap(analysis, network, layer, ablation, cls), per_class.get(cls)) for cls in classes]
    return [*cells, (res.ap(analysis, network, layer, ablation), paper.get("mAP"))]


def _class_columns() -> list[str]:
    return [*CLASS_SHORT.values(), "mAP"]


def table1(res: Results) -> Table:
    paper = paper_tables()["table1_gtbox_classification"]
    rows = [(PAPER_LAYER[layer], [(res.ap("probe_gtbox", "pretrained", layer),
                                   paper[PAPER_LAYER[layer]]["alexnet"]),
                                  (res.ap("probe_gtbox", "finetune_all", layer),
                                   paper[PAPER_LAYER[layer]]["finetuned"])])
            for layer in LAYERS]
    return Table("table1", "Table 1: layerwise effect of fine-tuning, GT-bbox classification (mAP %)",
                 "Layer", ["A-Net", "FT"], rows,
                 {("probe_gtbox", "pretrained"), ("probe_gtbox", "finetune_all")},
                 note="The paper prints this table in four side-by-side blocks; here one row per layer.")


TASKS = {"image_classification": ("probe_cls", "Image Classification"),
         "gtbox_classification": ("probe_gtbox", "GT Box Classification"),
         "detection": ("detection", "Detection")}
TUNE = {"alexnet": "pretrained", "all_tune": "finetune_all", "fc_tune": "finetune_fc"}


def table2(res: Results) -> Table:
    paper = paper_tables()["table2_finetuning_effect"]
    columns = [f"{title}: {net.replace('_', '-')}" for _, title in TASKS.values() for net in TUNE]
    rows = []
    for layer in ("pool5", "relu6", "relu7"):
        p = paper[PAPER_LAYER[layer]]
        rows.append((PAPER_LAYER[layer], [(res.ap(analysis, network, layer), p[task][net])
                                          for task, (analysis, _) in TASKS.items()
                                          for net, network in TUNE.items()]))
    needs = {(analysis, network) for analysis, _ in TASKS.values() for network in TUNE.values()}
    return Table("table2", "Table 2: effect of fine-tuning on three VOC 2007 tasks (mAP %); all-tune tunes "
                 "every layer, fc-tune keeps layers 1-5 fixed", "Layer", columns, rows, needs)


#: Table 3 rows: (network, layer) of the detection results.
TABLE3_ROWS = {"l5": ("pretrained", "pool5"), "l5-ft": ("finetune_all", "pool5"),
               "l6-ft": ("finetune_all", "relu6"), "l6-fc-ft": ("finetune_fc", "relu6"),
               "l7": ("pretrained", "relu7"), "l7-ft": ("finetune_all", "relu7"),
               "l7-fc-ft": ("finetune_fc", "relu7")}


def table3(res: Results) -> Table:
    paper = paper_tables()["table3_detection_finetuning"]
    rows = [(label, _per_class_row(res, "detection", net, layer, "unroll", paper.get(label)))
            for label, (net, layer) in TABLE3_ROWS.items()]
    return Table("table3", "Table 3: detection, fine-tuning effects (AP %)", "Feature", _class_columns(),
                 rows,
                 {("detection", n) for n, _ in TABLE3_ROWS.values()})


#: Table 4/5 columns or rows: the paper's ablation name -> ours (None: we have no such ablation).
TABLE4_ABLATIONS = {"unroll": "unroll", "spatial_shuffle": "shuffle", "spatial_max": "spatial_max",
                    "binarize": "binarize", "binarize_loc": "binarize_loc"}
TABLE4_TITLES = ["Unroll", "Spatial-Shuffle", "Spatial-Max", "Binarize", "Binarize+Loc"]


def table4(res: Results) -> Table:
    paper = paper_tables()["table4_classification_ablations"]
    rows = [(PAPER_LAYER_CONV[layer], [(res.ap("probe_cls", "pretrained", layer, ours),
                                        paper[PAPER_LAYER_CONV[layer]].get(theirs))
                                       for theirs, ours in TABLE4_ABLATIONS.items()]) for layer in LAYERS]
    return Table("table4", "Table 4: VOC 2007 image classification with feature ablations (mAP %, alex-net)",
                 "Layer Name", TABLE4_TITLES, rows, {("probe_cls", "pretrained")})


TABLE5_ROWS: dict[str, str | None] = {"spMax": "spatial_max", "sm-bn-lc": "binarize_loc", "crop-1": None,
                                      "binary": "binarize", "pool-5": "unroll"}


def table5(res: Results) -> Table:
    paper = paper_tables()["table5_detection_ablations"]
    rows = []
    for label, ablation in TABLE5_ROWS.items():
        cells = _per_class_row(res, "detection", "finetune_all", "pool5", ablation or "-", paper.get(label))
        rows.append((label, cells))
    return Table("table5", "Table 5: detection with feature ablations of pool-5 (AP %, fine-tuned network)",
                 "Feature", _class_columns(), rows, {("detection", "finetune_all")},
                 note="crop-1 has no counterpart among our ablations.")


def table6(res: Results) -> Table:
    paper = paper_tables()["table6_filters_needed"]
    classes = list(CLASS_SHORT)
    rows = []
    for frac, key in (("50", "filters_for_50pct"), ("90", "filters_for_90pct")):
        for net, network in (("AN", "pretrained"), ("FT", "finetune_all")):
            ours = {r.get("class"): r.get(f"k{frac}") for r in res.rows(network, "unit_count_summary")}
            rows.append((f"{net} {frac}%", [(_num(ours.get(c)), paper[net][key].get(c)) for c in classes]))
    return Table("table6", "Table 6: pool-5 filters needed for 50% / 90% of the full AP (AN: alex-net, "
                 f"FT: fine-tuned; ours: {unit_count_task(res)})", "Net AP", list(CLASS_SHORT.values()), rows,
                 {("unit_count_summary", "pretrained"), ("unit_count_summary", "finetune_all")}, digits=0)


def _num(value: Any) -> Number:
    return None if value is None else float(value)


def snapshot_columns(res: Results) -> list[tuple[str, int | None]]:
    """Table 7's paper iterations and the snapshot of ours each maps to (same fraction of
    pretraining, nearest snapshot we have)."""
    labels = paper_tables()["table7_snapshots_image_classification"]["iterations"]
    ours = sorted(set(res.snapshots) | set(_snapshot_eval_iterations(res)))
    final = max(ours) if ours else None
    out = []
    for label in labels:
        if final is None:
            out.append((label, None))
            continue
        target = iteration_of(label) * final / PAPER_PRETRAIN_ITERATIONS
        out.append((label, min(ours, key=lambda it: abs(it - target))))
    return out


def _snapshot_eval_rows(res: Results) -> list[dict[str, Any]]:
    for analyses in res.tables.values():
        if "snapshot_eval" in analyses:
            return list(analyses["snapshot_eval"].get("rows", []))
    return []


def _snapshot_eval_iterations(res: Results) -> set[int]:
    return {int(r["iteration"]) for r in _snapshot_eval_rows(res) if r.get("iteration") is not None}


def snapshot_map(res: Results, layer: str, iteration: int | None) -> Number:
    """Image-classification mAP (%) of ``layer`` at our snapshot ``iteration``: from the
    snapshot's probe_cls results, else from a snapshot_eval table."""
    if iteration is None:
        return None
    rows = res.snapshots.get(iteration, {}).get("probe_cls", {}).get("rows", [])
    for r in rows:
        if r.get("layer") == layer and r.get("ablation", "unroll") == "unroll" and r.get("class") == "mAP":
            return 100.0 * float(r["ap"])
    for r in _snapshot_eval_rows(res):
        if r.get("layer") == layer and r.get("iteration") == iteration and r.get("map") is not None:
            return 100.0 * float(r["map"])
    return None


def table7(res: Results) -> Table:
    paper = paper_tables()["table7_snapshots_image_classification"]
    columns = snapshot_columns(res)
    rows = [(PAPER_LAYER_CONV[layer], [(snapshot_map(res, layer, ours),
                                        paper["rows"][PAPER_LAYER_CONV[layer]][i])
                                       for i, (_, ours) in enumerate(columns)]) for layer in LAYERS]
    titles = [f"{label} (ours {it})" if it is not None else label for label, it in columns]
    return Table("table7", "Table 7: VOC 2007 image classification (mAP %) of alex-net's layers during "
                 "pretraining", "Layer", titles, rows, {("probe_cls", "snapshots")},
                 note="Our snapshot for each paper iteration: the same fraction of pretraining.")


TABLE8_ROWS = {"l5(50-50)": ("fifty_fifty", "pool5"), "l5 (full)": ("finetune_all", "pool5"),
               "l7(50-50)": ("fifty_fifty", "relu7"), "l7(full)": ("finetune_all", "relu7")}


def table8(res: Results) -> Table:
    paper = paper_tables()["table8_50_50_detection"]
    rows = [(label, _per_class_row(res, "detection", net, layer, "unroll", paper.get(label)))
            for label, (net, layer) in TABLE8_ROWS.items()]
    return Table("table8", "Table 8: detection with the 50-50 network (AP %; l5 = pool-5, l7 = relu-7)",
                 "Feature", _class_columns(), rows,
                 {("detection", "fifty_fifty"), ("detection", "finetune_all")})


TABLES: tuple[Callable[[Results], Table], ...] = (
    table1, table2, table3, table4, table5, table6, table7, table8)


def build_tables(res: Results) -> list[Table]:
    return [make(res) for make in TABLES]


def missing_results(res: Results, tables: list[Table]) -> list[tuple[str, str]]:
    """(analysis, network) results some table needs and the loaded runs do not have."""
    need = sorted({n for t in tables for n in t.needs})
    missing = []
    for analysis, network in need:
        if network == "snapshots":
            if not res.snapshots and not _snapshot_eval_rows(res):
                missing.append((analysis, network))
        elif not res.has(network, analysis):
            missing.append((analysis, network))
    return missing
