"""``snapshot_eval``: how each layer's features improve during pretraining (paper Sec. 6,
Table 7, Fig. 5).

At each snapshot iteration, the image-classification probe of ``probe_cls`` (whole VOC07 images,
one-vs-rest linear SVMs on trainval, AP on test; plain features only) runs on every configured
layer; the result is each layer's mAP against the training iteration, and that mAP as a
fraction of the layer's mAP at the last iteration.

* During training (``cnnft-train analyses=[snapshot_eval]``) it fires at every iteration the
  ``IterationSnapshots`` callback saves (``at_snapshots``) and at the end of fit; the rows so
  far live in its state, so a resumed run keeps the earlier iterations.
* Afterwards, ``cnnft-analyze checkpoint=<run>/snapshots analyses=[snapshot_eval]`` runs it on
  each snapshot (iteration = the checkpoint's global step) and ``finalize`` writes the combined
  table into the job's output directory.

Files: ``results/snapshot_eval.json|csv`` rows ``{iteration, layer, map, fraction_of_final}``
(rewritten after every iteration) and ``figures/snapshot_eval.png`` (mAP and fraction of final
against iteration, one line per layer).

Logged keys (W&B x axis: ``snapshot_eval/iteration``; CSV step: the iteration):

=============================  ===========================================
``snapshot_eval/iteration``    training iteration of the probed network
``snapshot_eval/<layer>/mAP``  VOC07 image-classification mAP of the layer
=============================  ===========================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from analyses.probe_cls import ProbeCls
from cnnft.ablations import unroll
from cnnft.analysis import AnalysisContext, define_step_axis, save_figure, write_table
from cnnft.errors import ConfigError
from cnnft.probing import run_probes

ITERATION_KEY = "snapshot_eval/iteration"


def snapshot_table(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{iteration, layer, map, fraction_of_final}`` from ``{iteration, layer, map}``
    records, by layer (first-seen order) then iteration; the fraction is relative to the layer's
    mAP at its last iteration (``None`` where that is 0)."""
    layers = list(dict.fromkeys(h["layer"] for h in history))
    rows = []
    for layer in layers:
        points = sorted((int(h["iteration"]), float(h["map"])) for h in history if h["layer"] == layer)
        final = points[-1][1]
        rows += [{"iteration": it, "layer": layer, "map": m,
                  "fraction_of_final": m / final if final > 0 else None} for it, m in points]
    return rows


def plot_snapshot_eval(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Two panels against iteration, one line per layer: mAP (%) and fraction of final mAP."""
    from cnnft.plotting import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    iterations = sorted({r["iteration"] for r in rows})
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        xs = [r["iteration"] for r in mine]
        left.plot(xs, [100 * r["map"] for r in mine], marker="o", label=layer)
        frac = [(r["iteration"], r["fraction_of_final"]) for r in mine if r["fraction_of_final"] is not None]
        if frac:
            right.plot(*zip(*frac, strict=True), marker="o", label=layer)
    log_x = bool(iterations) and iterations[0] > 0 and iterations[-1] >= 20 * iterations[0]
    for ax, label in ((left, "mAP (%)"), (right, "fraction of final mAP")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    right.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.legend(fontsize=8)
    fig.suptitle("VOC07 image classification during pretraining")
    return fig


class SnapshotEval(ProbeCls):
    """The image-classification probe of every layer at each snapshot (see module doc)."""

    name = "snapshot_eval"
    title = "VOC07 image classification at each snapshot"

    def __init__(self, *, at_snapshots: bool = True, **kwargs: Any) -> None:
        if "ablations" in kwargs:
            raise ConfigError("snapshot_eval probes plain features only (ablation unroll); "
                              "remove 'ablations' from analyses.snapshot_eval")
        super().__init__(at_snapshots=at_snapshots, **kwargs)

    def run(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, float]:
        if ctx.step is None:
            raise ConfigError("snapshot_eval needs the training iteration of the network (ctx.step)")
        rows = run_probes(model, self.split(ctx, self.train_split), self.split(ctx, self.test_split),
                          layers=self.layers, ablations={"unroll": unroll}, svm=self.svm, ctx=ctx,
                          train_difficult=self.train_difficult, ap_mode=self.ap_mode)
        maps = {r["layer"]: r["ap"] for r in rows if r["class"] == "mAP"}
        iteration = int(ctx.step)
        self.history = [h for h in self.history if h["iteration"] != iteration]
        self.history += [{"iteration": iteration, "layer": layer, "map": m} for layer, m in maps.items()]
        define_step_axis(ctx.loggers, self.name, ITERATION_KEY)
        return {ITERATION_KEY: float(iteration),
                **{f"{self.name}/{layer}/mAP": m for layer, m in maps.items()}}

    def finalize(self, ctx: AnalysisContext) -> None:
        if not self.history:
            return
        rows = snapshot_table(self.history)
        last = max(r["iteration"] for r in rows)
        summary: dict[str, Any] = {ITERATION_KEY: last}
        summary.update({f"{self.name}/{r['layer']}/mAP": r["map"] for r in rows if r["iteration"] == last})
        write_table(ctx, self.name, rows, summary)
        save_figure(ctx, plot_snapshot_eval(rows), self.name)
