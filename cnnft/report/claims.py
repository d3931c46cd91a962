"""The paper's claims, each a small function over numbers that holds (yes), fails (no) or
cannot be checked (n/a) on a run. The same function is evaluated on the paper's own numbers,
so the report shows both verdicts side by side.

A claim reads numbers through :class:`Numbers` (ours: :class:`OursNumbers`, the paper's:
:class:`PaperNumbers`); every value is in percent (AP) or in filters (unit counts) or bits (AuE).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from cnnft.report.load import Results
from cnnft.report.paper import LAYERS, PAPER_LAYER, PAPER_LAYER_CONV, paper_tables
from cnnft.report.tables import (
    TABLE3_ROWS,
    TABLE4_ABLATIONS,
    TABLE5_ROWS,
    TABLE8_ROWS,
    snapshot_columns,
    snapshot_map,
)

Number = float | None


class Numbers:
    """What a claim may ask; ``None`` where the source has no such number."""

    def map(self, analysis: str, network: str, layer: str, ablation: str = "unroll") -> Number:
        raise NotImplementedError

    def snapshot(self, layer: str, paper_iteration: str) -> Number:
        raise NotImplementedError

    def aue(self, network: str, layer: str) -> Number:
        return None

    def filters_needed(self, network: str, fraction: int) -> list[float]:
        """Per class: the number of pool-5 filters needed for ``fraction`` % of the full AP."""
        raise NotImplementedError

    def num_filters(self) -> Number:
        return None


class OursNumbers(Numbers):
    def __init__(self, res: Results) -> None:
        self.res = res
        self.columns = dict(snapshot_columns(res))

    def map(self, analysis: str, network: str, layer: str, ablation: str = "unroll") -> Number:
        return self.res.ap(analysis, network, layer, ablation)

    def snapshot(self, layer: str, paper_iteration: str) -> Number:
        return snapshot_map(self.res, layer, self.columns.get(paper_iteration))

    def aue(self, network: str, layer: str) -> Number:
        table = self.res.tables.get(network, {}).get("filter_entropy")
        if table is None:
            return None
        value = table.get("summary", {}).get(f"filter_entropy/{layer}/mean_aue")
        if value is None:
            values = [r["aue"] for r in table.get("rows", []) if r.get("layer") == layer]
            value = statistics.fmean(values) if values else None
        return None if value is None else float(value)

    def filters_needed(self, network: str, fraction: int) -> list[float]:
        return [float(r[f"k{fraction}"]) for r in self.res.rows(network, "unit_count_summary")
                if r.get(f"k{fraction}") is not None]

    def num_filters(self) -> Number:
        ks = [r["k"] for net in ("pretrained", "finetune_all") for r in self.res.rows(net, "unit_count")
              if isinstance(r.get("k"), int | float)]
        return float(max(ks)) if ks else None


class PaperNumbers(Numbers):
    """The paper's Tables 1-8 behind the same questions."""

    def __init__(self) -> None:
        t = paper_tables()
        idx: dict[tuple[str, str, str, str], Number] = {}
        for layer in LAYERS:
            row = t["table1_gtbox_classification"][PAPER_LAYER[layer]]
            idx["probe_gtbox", "pretrained", layer, "unroll"] = row["alexnet"]
            idx["probe_gtbox", "finetune_all", layer, "unroll"] = row["finetuned"]
            for theirs, ours in TABLE4_ABLATIONS.items():
                idx["probe_cls", "pretrained", layer, ours] = t["table4_classification_ablations"][
                    PAPER_LAYER_CONV[layer]][theirs]
        for layer in ("pool5", "relu6", "relu7"):
            row = t["table2_finetuning_effect"][PAPER_LAYER[layer]]
            for task, analysis in (("image_classification", "probe_cls"),
                                   ("gtbox_classification", "probe_gtbox"), ("detection", "detection")):
                for net, network in (("alexnet", "pretrained"), ("all_tune", "finetune_all"),
                                     ("fc_tune", "finetune_fc")):
                    if row[task][net] is not None:
                        idx.setdefault((analysis, network, layer, "unroll"), row[task][net])
        for label, (network, layer) in TABLE3_ROWS.items():
            idx["detection", network, layer, "unroll"] = t["table3_detection_finetuning"][label]["mAP"]
        for label, ablation in TABLE5_ROWS.items():
            if ablation and ablation != "unroll":
                idx["detection", "finetune_all", "pool5", ablation] = (
                    t["table5_detection_ablations"][label]["mAP"])
        for label, (network, layer) in TABLE8_ROWS.items():
            idx.setdefault(("detection", network, layer, "unroll"), t["table8_50_50_detection"][label]["mAP"])
        self.idx, self.t = idx, t

    def map(self, analysis: str, network: str, layer: str, ablation: str = "unroll") -> Number:
        return self.idx.get((analysis, network, layer, ablation))

    def snapshot(self, layer: str, paper_iteration: str) -> Number:
        t7 = self.t["table7_snapshots_image_classification"]
        if paper_iteration not in t7["iterations"]:
            return None
        return t7["rows"][PAPER_LAYER_CONV[layer]][t7["iterations"].index(paper_iteration)]

    def filters_needed(self, network: str, fraction: int) -> list[float]:
        net = {"pretrained": "AN", "finetune_all": "FT"}[network]
        return [float(v) for v in self.t["table6_filters_needed"][net][f"filters_for_{fraction}pct"].values()]

    def num_filters(self) -> Number:
        return 256.0


# ---------------------------------------------------------------- claims

Verdict = tuple[bool | None, str]


def _f(v: Number) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _gain(n: Numbers, analysis: str, layer: str, tuned: str = "finetune_all",
          base: str = "pretrained") -> Number:
    a, b = n.map(analysis, tuned, layer), n.map(analysis, base, layer)
    return None if a is None or b is None else a - b


def fc_aue_changes_most(n: Numbers) -> Verdict:
    change = {}
    for layer in LAYERS:
        a, b = n.aue("pretrained", layer), n.aue("finetune_all", layer)
        if a is not None and b is not None:
            change[layer] = abs(b - a)
    fc = [change[k] for k in ("relu6", "relu7") if k in change]
    conv = [change[k] for k in LAYERS[:5] if k in change]
    if not fc or not conv:
        return None, "needs filter_entropy for pretrained and finetune_all"
    text = ", ".join(f"{k} {v:.3f}" for k, v in change.items())
    return min(fc) > max(conv), f"|mean AuE change|: {text}"


def gtbox_gain_relu7_vs_pool5(n: Numbers) -> Verdict:
    g7, g5 = _gain(n, "probe_gtbox", "relu7"), _gain(n, "probe_gtbox", "pool5")
    if g7 is None or g5 is None:
        return None, "needs probe_gtbox for pretrained and finetune_all"
    return g7 >= g5 - 0.05, f"gain relu-7 {g7:+.1f} vs pool-5 {g5:+.1f} points"


def gtbox_gain_fc_vs_low(n: Numbers) -> Verdict:
    fc = [_gain(n, "probe_gtbox", k) for k in ("relu6", "relu7")]
    low = [_gain(n, "probe_gtbox", k) for k in ("pool1", "pool2")]
    if None in fc or None in low:
        return None, "needs probe_gtbox at pool1, pool2, relu6, relu7 for pretrained and finetune_all"
    a, b = statistics.fmean(fc), statistics.fmean(low)  # type: ignore[arg-type]
    return a > b + 0.05, f"mean gain fc6/fc7 {a:+.1f} vs pool-1/pool-2 {b:+.1f} points"


def image_cls_unchanged_by_finetuning(n: Numbers, tolerance: float = 2.0) -> Verdict:
    gains = {k: _gain(n, "probe_cls", k) for k in ("pool5", "relu6", "relu7")}
    if None in gains.values():
        return None, "needs probe_cls at pool5, relu6, relu7 for pretrained and finetune_all"
    text = ", ".join(f"{PAPER_LAYER[k]} {v:+.1f}" for k, v in gains.items())
    return all(abs(v) <= tolerance for v in gains.values()), f"change: {text} points (tolerance {tolerance})"  # type: ignore[arg-type]


def shuffle_hurts_pool5_little(n: Numbers, keep: float = 0.85) -> Verdict:
    plain = n.map("probe_cls", "pretrained", "pool5")
    shuffled = n.map("probe_cls", "pretrained", "pool5", "shuffle")
    if plain is None or shuffled is None:
        return None, "needs probe_cls with the shuffle ablation on the pretrained network"
    return shuffled >= keep * plain, (f"pool-5 {plain:.1f} -> shuffled {shuffled:.1f} "
                                      f"({shuffled / plain:.0%} kept)")


def spatial_max_hurts_detection(n: Numbers, drop: float = 10.0) -> Verdict:
    plain = n.map("detection", "finetune_all", "pool5")
    smax = n.map("detection", "finetune_all", "pool5", "spatial_max")
    if plain is None or smax is None:
        return None, "needs detection with the spatial_max ablation on the fine-tuned network"
    return plain - smax >= drop, f"pool-5 {plain:.1f} -> spatial max {smax:.1f} ({smax - plain:+.1f} points)"


def spatial_max_fine_for_classification(n: Numbers, keep: float = 0.9) -> Verdict:
    plain = n.map("probe_cls", "pretrained", "pool5")
    smax = n.map("probe_cls", "pretrained", "pool5", "spatial_max")
    if plain is None or smax is None:
        return None, "needs probe_cls with the spatial_max ablation on the pretrained network"
    return smax >= keep * plain, f"pool-5 {plain:.1f} -> spatial max {smax:.1f} ({smax / plain:.0%} kept)"


def binarize_fc_unchanged(n: Numbers, tolerance: float = 2.0) -> Verdict:
    out, ok = [], True
    for layer in ("relu6", "relu7"):
        plain = n.map("probe_cls", "pretrained", layer)
        binary = n.map("probe_cls", "pretrained", layer, "binarize")
        if plain is None or binary is None:
            return None, "needs probe_cls with the binarize ablation at relu6/relu7"
        ok &= abs(binary - plain) <= tolerance
        out.append(f"{PAPER_LAYER[layer]} {plain:.1f} -> {binary:.1f}")
    return ok, "; ".join(out)


def fc_tuning_recovers_detection(n: Numbers, share: float = 0.75) -> Verdict:
    base = n.map("detection", "pretrained", "relu7")
    full, fc = n.map("detection", "finetune_all", "relu7"), n.map("detection", "finetune_fc", "relu7")
    if None in (base, full, fc):
        return None, "needs detection at relu7 for pretrained, finetune_all, finetune_fc"
    if full <= base:  # type: ignore[operator]
        return False, f"no gain to recover: alex-net {_f(base)}, all-tune {_f(full)}, fc-tune {_f(fc)}"
    frac = (fc - base) / (full - base)  # type: ignore[operator]
    kept = f"{frac:.0%} of the gain" if frac <= 1 else "more than all-tune's gain"
    return frac >= share, (f"relu-7: alex-net {_f(base)}, all-tune {_f(full)} ({full - base:+.1f}), "  # type: ignore[operator]
                           f"fc-tune {_f(fc)} ({fc - base:+.1f}): {kept}")  # type: ignore[operator]


def deeper_layers_classify_better(n: Numbers) -> Verdict:
    values = [n.map("probe_cls", "pretrained", k) for k in ("pool1", "pool2", "pool5", "relu7")]
    if None in values:
        return None, "needs probe_cls at pool1, pool2, pool5, relu7 for the pretrained network"
    return all(a < b for a, b in zip(values, values[1:])), "pool-1 < pool-2 < pool-5 < relu-7: " + ", ".join(
        _f(v) for v in values)


def early_snapshots_close_to_final(n: Numbers, fraction: float = 0.8) -> Verdict:
    ratios = {}
    for layer in LAYERS:
        early, final = n.snapshot(layer, "15K"), n.snapshot(layer, "310K")
        if early is None or not final:
            return None, "needs probe_cls on the pretraining snapshots"
        ratios[layer] = early / final
    text = ", ".join(f"{PAPER_LAYER[k]} {v:.0%}" for k, v in ratios.items())
    return min(ratios.values()) >= fraction, f"15K/310K: {text}"


def fifty_fifty_close_to_full(n: Numbers, fraction: float = 0.85) -> Verdict:
    half, full = n.map("detection", "fifty_fifty", "relu7"), n.map("detection", "finetune_all", "relu7")
    if half is None or not full:
        return None, "needs detection at relu7 for fifty_fifty and finetune_all"
    return half >= fraction * full, f"relu-7: 50-50 {half:.1f} vs full {full:.1f} ({half / full:.0%})"


def representation_is_distributed(n: Numbers, share: float = 0.1) -> Verdict:
    k90, units = n.filters_needed("pretrained", 90), n.num_filters()
    if not k90 or not units:
        return None, "needs unit_count (summary) for the pretrained network"
    med = statistics.median(k90)
    return med >= share * units, (f"median filters for 90% of full AP: {med:g} of {units:g} "
                                  f"({med / units:.0%})")


def finetuning_needs_fewer_filters(n: Numbers) -> Verdict:
    an, ft = n.filters_needed("pretrained", 90), n.filters_needed("finetune_all", 90)
    if not an or not ft:
        return None, "needs unit_count (summary) for pretrained and finetune_all"
    a, b = statistics.median(an), statistics.median(ft)
    return b <= a, f"median filters for 90%: alex-net {a:g}, fine-tuned {b:g}"


@dataclass(frozen=True)
class Claim:
    text: str
    section: str
    check: Callable[[Numbers], Verdict]


CLAIMS: tuple[Claim, ...] = (
    Claim("Fine-tuning changes fc6/fc7 filter selectivity (mean AuE) more than the conv layers'",
          "3.2, Fig. 1", fc_aue_changes_most),
    Claim("Fine-tuning helps GT-box classification at relu-7 at least as much as at pool-5", "Table 1",
          gtbox_gain_relu7_vs_pool5),
    Claim("Fine-tuning helps GT-box classification more at fc6/fc7 than at pool-1/pool-2", "Table 1",
          gtbox_gain_fc_vs_low),
    Claim("Fine-tuning leaves image classification nearly unchanged (within 2 points)", "3.3, Table 2",
          image_cls_unchanged_by_finetuning),
    Claim("fc-only tuning recovers most (>= 75%) of the detection gain at relu-7", "3.3, Tables 2-3",
          fc_tuning_recovers_detection),
    Claim("Deeper layers classify images better (pool-1 < pool-2 < pool-5 < relu-7)", "Tables 4, 7",
          deeper_layers_classify_better),
    Claim("Spatial shuffle hurts pool-5 image classification little (>= 85% kept)", "4.1, Table 4",
          shuffle_hurts_pool5_little),
    Claim("Spatial max is nearly as good as unrolled pool-5 for image classification (>= 90% kept)",
          "4.1, Table 4", spatial_max_fine_for_classification),
    Claim("Spatial max hurts pool-5 detection badly (>= 10 points)", "4.1, Table 5",
          spatial_max_hurts_detection),
    Claim("Binarizing fc6/fc7 barely changes image classification (within 2 points)", "4.2, Table 4",
          binarize_fc_unchanged),
    Claim("The representation is distributed: the median class needs >= 10% of pool-5 filters for 90% of "
          "its AP", "5.2, Table 6", representation_is_distributed),
    Claim("The fine-tuned network needs no more filters than alex-net (median, 90%)", "5.2, Table 6",
          finetuning_needs_fewer_filters),
    Claim("By 15K of 310K iterations every layer is within 80% of its final image-classification mAP",
          "6, Table 7", early_snapshots_close_to_final),
    Claim("The 50-50 network reaches >= 85% of the full network's relu-7 detection mAP", "6, Table 8",
          fifty_fifty_close_to_full),
)


@dataclass
class ClaimResult:
    claim: Claim
    ours: Verdict
    paper: Verdict

    @staticmethod
    def word(verdict: bool | None) -> str:
        return "n/a" if verdict is None else ("yes" if verdict else "no")


def evaluate_claims(res: Results) -> list[ClaimResult]:
    ours, paper = OursNumbers(res), PaperNumbers()
    return [ClaimResult(c, c.check(ours), c.check(paper)) for c in CLAIMS]


__all__ = ["CLAIMS", "Claim", "ClaimResult", "Numbers", "OursNumbers", "PaperNumbers",
           "evaluate_claims"]
