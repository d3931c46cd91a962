"""The paper's Figures 1, 4 and 5 re-drawn from our results (matplotlib, Agg).

Each function returns a figure, or ``None`` when the results it needs are missing.
"""

from __future__ import annotations

from typing import Any

from cnnft.errors import DataError
from cnnft.plotting import filter_grid, pyplot, show_filter_grid
from cnnft.report.load import Results
from cnnft.report.paper import CLASS_SHORT, LAYERS, PAPER_LAYER, PAPER_PRETRAIN_ITERATIONS

NETS = (("pretrained", "alex-net", "-."), ("finetune_all", "fine-tuned", "-"))


def figure1(res: Results) -> Any | None:
    """AuE distribution per layer, and mean AuE of the top-k% most selective filters
    (dash-dot: alex-net, solid: fine-tuned)."""
    if not any(res.has(net, "filter_entropy") for net, _, _ in NETS):
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(LAYERS, plt.get_cmap("viridis")([i / (len(LAYERS) - 1) for i in range(len(LAYERS))])))
    for net, title, style in NETS:
        rows = res.rows(net, "filter_entropy")
        for layer in LAYERS:
            values = [r["aue"] for r in rows if r.get("layer") == layer]
            if values:
                left.hist(values, bins=20, histtype="step", linestyle=style, color=colors[layer],
                          label=f"{PAPER_LAYER[layer]} {title}")
        topk = res.rows(net, "filter_entropy_topk")
        for layer in LAYERS:
            pts = sorted((r["k"], r["mean_aue"]) for r in topk if r.get("layer") == layer)
            if pts:
                total = max(k for k, _ in pts)
                right.plot([100 * k / total for k, _ in pts], [v for _, v in pts], linestyle=style,
                           color=colors[layer], label=f"{PAPER_LAYER[layer]} {title}")
    left.set(xlabel="area under the entropy curve (AuE)", ylabel="number of filters", title="AuE per filter")
    right.set(xlabel="top k% most selective filters", ylabel="mean AuE", title="mean AuE of the top k%")
    right.legend(fontsize=6, ncol=2)
    fig.suptitle("Fig. 1: filter selectivity (dash-dot: alex-net, solid: fine-tuned)")
    fig.tight_layout()
    return fig


#: What unit_count's ``task`` classifies, as the report names it.
TASK_TITLE = {"gtbox": "GT-box classification", "image": "image classification"}


def unit_count_task(res: Results) -> str:
    """The task the loaded unit_count results ran (``summary.task``), for titles: one name, both
    joined with " / " if the networks differ, "classification (task not recorded)" for results
    written before the task was recorded."""
    tasks = sorted({res.tables.get(net, {}).get(name, {}).get("summary", {}).get("task") or "?"
                    for net, _, _ in NETS for name in ("unit_count", "unit_count_summary")
                    if res.has(net, name)})
    if not tasks or tasks == ["?"]:
        return "classification (task not recorded)"
    return " / ".join(TASK_TITLE.get(t, f"{t} classification") for t in tasks if t != "?")


def figure4(res: Results) -> Any | None:
    """AP(k) per class: AP of a linear SVM on the k most important pool-5 filters."""
    if not any(res.has(net, "unit_count") for net, _, _ in NETS):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(4, 5, figsize=(13, 9), sharex=True, sharey=True)
    for ax, cls in zip(axes.flat, CLASS_SHORT):
        for net, title, style in NETS:
            pts = sorted((r["k"], 100 * r["ap"]) for r in res.rows(net, "unit_count")
                         if r.get("class") == cls and isinstance(r.get("k"), int | float))
            if pts:
                ax.plot(*zip(*pts), linestyle=style, marker=".", label=title)
        ax.set_title(CLASS_SHORT[cls], fontsize=9)
        ax.set_xscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("number of pool-5 filters k")
    fig.supylabel("AP (%)")
    fig.suptitle(f"Fig. 4: {unit_count_task(res)} AP with the k most important pool-5 filters")
    fig.tight_layout()
    return fig


def _conv1_grid(path: Any, first_conv: str = "conv1") -> Any:
    """The first convolution's filters of a checkpoint as one image (``cnnft.plotting.filter_grid``):
    ``conv1`` in CaffeNet, ``model.first_conv`` in another model (its weights under ``module.``)."""
    from cnnft.checkpoint import model_state, read_checkpoint

    state = model_state(read_checkpoint(path), path)
    for key in (f"{first_conv}.weight", f"module.{first_conv}.weight"):
        if key in state:
            return filter_grid(state[key])
    raise DataError(f"{path} has no weights of the first convolution {first_conv!r} (model.first_conv)")


def figure5(res: Results) -> Any | None:
    """conv1 filters at three snapshots (5K, 15K, 225K of 310K, scaled), training loss and
    validation top-1 during pretraining."""
    loss, top1 = res.curves.get("train/loss"), res.curves.get("val/top1")
    if not res.snapshot_files and not loss:
        return None
    iterations = sorted(res.snapshot_files)
    picks: list[int] = []
    if iterations:
        final = max(iterations)
        for paper_it in (5_000, 15_000, 225_000):
            target = paper_it * final / PAPER_PRETRAIN_ITERATIONS
            best = min(iterations, key=lambda it: abs(it - target))
            if best not in picks:
                picks.append(best)
    first_conv = str(res.info.get("first_conv") or "conv1")
    title = "conv1" if first_conv == "conv1" else f"conv1 ({first_conv})"
    plt = pyplot()
    # grids above, curves below, each row a sub-figure laid out on its own (subplots of a 2x3 and
    # a 2x2 grid in one figure overlapped: the grids covered the curves' titles)
    fig = plt.figure(figsize=(11, 7.5 if picks else 3.8), layout="constrained")
    bottom = fig
    if picks:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1.0])
        for ax, it in zip(top.subplots(1, 3), [*picks, None, None]):
            ax.axis("off")
            if it is not None:
                show_filter_grid(ax, _conv1_grid(res.snapshot_files[it], first_conv),
                                 f"{title} at iteration {it}", fontsize=9)
    left, right = bottom.subplots(1, 2)
    for ax, curve, scale, ylabel, title, style in (
            (left, loss, 1, "training loss", "training loss", {"lw": 0.8}),
            (right, top1, 100, "top-1 (%)", "validation top-1 (ImageNet layout)", {"marker": "."})):
        ax.set(xlabel="iteration", ylabel=ylabel, title=title)
        if curve:
            ax.plot(curve[0], scale * curve[1], **style)
        else:  # no empty axes: say what is missing
            ax.text(0.5, 0.5, f"no {title} logged", ha="center", va="center", transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])
    fig.suptitle("Fig. 5: conv1 filters during pretraining; training loss and validation accuracy")
    return fig


FIGURES = {"figure1_filter_entropy": figure1, "figure4_unit_count": figure4, "figure5_training": figure5}
