"""Write the report: ``report.md``, a self-contained ``report.html``, ``tables/*.csv``,
``figures/*.png``, and optionally a W&B run holding the tables and figures."""

from __future__ import annotations

import base64
import csv
import io
import logging
import re
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cnnft.io import atomic_write
from cnnft.plotting import save_png
from cnnft.report.claims import ClaimResult, evaluate_claims
from cnnft.report.figures import FIGURES
from cnnft.report.load import Results, load_results
from cnnft.report.margins import CRITERION, LEVEL, SAMPLES, margin_rows, margins_table, write_margins
from cnnft.report.paper import NETWORK_TITLE, NETWORKS, PAPER_LAYER
from cnnft.report.tables import Table, build_tables, missing_results

log = logging.getLogger(__name__)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _overrides(calls: Sequence[dict], info: dict) -> str:
    """The overrides of each call (``call 1: ...; call 2: ...``), or of the one call."""
    if len(calls) <= 1:
        return " ".join((calls[0] if calls else info).get("overrides") or []) or "none"
    return "; ".join(f"call {i}: {' '.join(c.get('overrides') or []) or 'none'}"
                     for i, c in enumerate(calls, 1))


def header_md(res: Results) -> str:
    info = res.info
    calls = info.get("calls") or []
    commits = ", ".join(dict.fromkeys(str(c["commit"]) for c in calls if c.get("commit")))
    scale = info.get("scale") or "unknown"
    model = str(info.get("model") or "caffenet")
    lines = ["# Reproduction report: Agrawal, Girshick, Malik 2014", ""]
    if model != "caffenet":
        roles = ", ".join(f"{PAPER_LAYER[p]} = `{m}`" for p, m in res.roles.items()) or "none"
        lines += [f"> **Model: {model}.** The paper used CaffeNet: every paper number here (in "
                  "parentheses, and the claims' \"paper's numbers\") is CaffeNet's. Rows named after "
                  f"CaffeNet's layers hold this model's layer in the same role ({roles}); a role this model "
                  "has no layer for reads `n/a`. Every layer's results are in the analyses' `results/` "
                  "files.", ""]
    if scale != "paper":
        lines += [f"> **Scale: {scale}.** These numbers come from the `{scale}` setting (a small network on "
                  "generated data), not from the paper's setup; they show that the pipeline runs and what it "
                  "measures, and are not comparable to the paper's numbers in parentheses.", ""]
    facts = [("scale", scale), ("model", model), ("ImageNet root", info.get("imagenet_root") or "n/a"),
             ("VOC 2007 root", info.get("voc_root") or "n/a"),
             ("git commit", commits or info.get("commit") or "unknown"),
             ("run started", info.get("started") or "n/a"),
             ("report built", datetime.now().isoformat(timespec="seconds")),
             ("machine", info.get("machine") or "n/a"),
             ("overrides", _overrides(calls, info)),
             ("sources", ", ".join(str(p) for p in res.sources))]
    lines += [_md_table(["", ""], [[f"**{k}**", f"`{v}`"] for k, v in facts]), "",
              "Cells read **ours (paper)**: our number, then the paper's in parentheses"
              + ("" if model == "caffenet" else " (CaffeNet's: the paper used CaffeNet)")
              + "; `n/a` = we have no result for that cell, `-` = the paper gives none.", ""]
    return "\n".join(lines)


def claims_md(claims: list[ClaimResult], model: str = "caffenet") -> str:
    rows = [[c.claim.text, c.claim.section, f"**{ClaimResult.word(c.ours[0])}**: {c.ours[1]}",
             f"{ClaimResult.word(c.paper[0])}: {c.paper[1]}"] for c in claims]
    other, paper = ("", "") if model == "caffenet" else (f" ({model})", " (CaffeNet)")
    held = sum(c.ours[0] is True for c in claims)
    checked = sum(c.ours[0] is not None for c in claims)
    return "\n".join(["## The paper's claims on this run", "",
                      f"{held} of {checked} checkable claims hold here ({len(claims) - checked} not "
                      "checkable with the results at hand).", "",
                      _md_table(["claim", "paper section", "this run" + other, "paper's numbers" + paper],
                                rows), ""])


def table_md(table: Table) -> str:
    parts = [f"### {table.title}", "", _md_table([table.corner, *table.columns], table.text_rows()), ""]
    if table.note:
        parts += [f"*{table.note}*", ""]
    return "\n".join(parts)


def write_table_csv(table: Table, folder: Path) -> Path:
    """``tables/<key>.csv``: one line per cell (row, column, ours, paper)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([table.corner, "column", "ours", "paper"])
    for (label, cells) in table.rows:
        for column, (ours, paper) in zip(table.columns, cells):
            writer.writerow([label, column, "" if ours is None else round(ours, 4),
                             "" if paper is None else paper])
    return atomic_write(folder / f"{table.key}.csv", lambda tmp: tmp.write_text(buf.getvalue()))


def baselines_md(res: Results, margins: Sequence[dict] = ()) -> str:
    """Pretrained vs random network vs the low-level control (mAP %): image and GT-box
    classification at pool5 and relu7; the control's row holds its colour + gradient SVMs.
    ``margins``: rows of ``cnnft.report.margins.margin_rows``, shown in a second table."""
    control = {(r.get("task"), r.get("features")): 100.0 * float(r["ap"])
               for r in res.rows("control", "lowlevel_control") if r.get("class") == "mAP"}
    if not control and not res.has("random", "probe_cls"):
        return margins_md(margins, always=False)

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    rows = [[NETWORK_TITLE[net], *(cell(res.ap(a, net, layer)) for a in ("probe_cls", "probe_gtbox")
                                   for layer in ("pool5", "relu7"))] for net in ("pretrained", "random")]
    for feats in ("colour", "gradient", "colour+gradient"):
        value = [cell(control.get((task, feats))) for task in ("cls", "gtbox")]
        rows.append([f"{NETWORK_TITLE['control']}: {feats} histograms", *(v for v in value for _ in "ab")])
    header = ["network", "image cls pool5", "image cls relu7", "GT-box pool5", "GT-box relu7"]
    return "\n".join(["## Baselines: what pretraining adds", "",
                      "The pretrained network against a random one and against linear SVMs on colour "
                      "and gradient-orientation histograms of the pixels (`lowlevel_control`; one "
                      "value per task, repeated under both layers). mAP %, VOC07 test.", "",
                      _md_table(header, rows), "", margins_md(margins, always=True)])


def margins_md(rows: Sequence[dict], *, always: bool) -> str:
    """The margins of the pretrained network over its baselines with their bootstrap intervals;
    a table of n/a rows (each saying why) only when ``always``."""
    if not rows or (not always and all(r.get("margin") is None for r in rows)):
        return ""
    header, text = margins_table(rows)
    samples = max((r.get("samples") or 0 for r in rows), default=0) or SAMPLES
    return "\n".join([f"### The margin over each baseline, with a bootstrap {LEVEL:.0%} interval", "",
                      f"alex-net's mAP minus the baseline's (points), and the {LEVEL:.0%} percentile "
                      f"interval of that margin over {samples} paired resamples of the test images "
                      "(the same images for both; an image's boxes or detections go with it), from "
                      "the analyses' score files (`results/<analysis>_scores.npz`; VOC07 11-point AP). "
                      f"Criterion (issue 13): {CRITERION}. The control baseline is the feature set "
                      "with the highest mAP on that task. Also in `tables/baseline_margins.json|csv`.",
                      "", _md_table(header, text), ""])


def status_md(res: Results, missing: list[tuple[str, str]]) -> str:
    lines = ["## What this report is missing", ""]
    if missing:
        by_analysis: dict[str, list[str]] = {}
        for analysis, network in missing:
            by_analysis.setdefault(analysis, []).append(network)
        lines += [f"- `{a}`: no results for {', '.join(nets)}" for a, nets in by_analysis.items()]
    else:
        lines.append("- nothing: every table has the results it reads.")
    if res.failures:
        lines += ["", "Failed units (their error; the other units' results are kept):", ""]
        lines += [f"- `{f['unit']}`: {f['error']}" for f in res.failures]
    calls = res.info.get("calls") or []
    if res.stages or calls:
        lines += ["", "## Stages", ""]

    def seconds(entry: dict) -> str:
        return "" if entry.get("wall_s") is None else f"{entry['wall_s']:.0f}"

    if calls:
        lines += [f"`cnnft-reproduce` calls on this root ({len(calls)}; each unit's latest status is "
                  "below, with the call that set it; `unfinished`: still running, e.g. the call that "
                  "built this report, or killed):", "",
                  _md_table(["call", "started", "stages", "overrides", "commit", "status", "wall time (s)"],
                            [[str(i), c.get("started", ""), " ".join(c.get("stages") or []),
                              " ".join(c.get("overrides") or []) or "none", c.get("commit", ""),
                              c.get("status", ""), seconds(c)] for i, c in enumerate(calls, 1)]), ""]
    if res.stages:
        lines.append(_md_table(["unit", "status", "wall time (s)", "call"],
                               [[k, v.get("status", ""), seconds(v), str(v.get("call", ""))]
                                for k, v in res.stages.items()]))
        total = sum(c["wall_s"] for c in calls if c.get("wall_s") is not None)
        if total:
            lines.append(f"\nTotal wall time of the {len(calls)} `cnnft-reproduce` call(s): {total:.0f} s.")
    return "\n".join(lines) + "\n"


def figures_md(res: Results, out: Path) -> str:
    folder = out / "figures"
    lines = ["## Figures", ""]
    for name, make in FIGURES.items():
        try:
            fig = make(res)
        except Exception as e:  # a broken input file must not stop the report
            log.exception("figure %s failed", name)
            lines += [f"- {name}: could not be drawn ({type(e).__name__}: {e})", ""]
            continue
        if fig is None:
            lines += [f"- {name}: n/a (its results are missing)", ""]
            continue
        save_png(fig, folder / f"{name}.png", dpi=110)
        lines += [f"![{name}](figures/{name}.png)", ""]
    gallery = []
    for network in [*NETWORKS, *sorted(set(res.figures) - set(NETWORKS))]:
        for src in res.figures.get(network, []):
            target = folder / f"{network}__{src.name}"
            shutil.copyfile(src, target)
            gallery.append(f"![{network}: {src.stem}](figures/{target.name})")
    if gallery:
        lines += ["### Figures written by the analyses", "", *gallery, ""]
    return "\n".join(lines)


def networks_md(res: Results) -> str:
    rows = []
    for network in [*NETWORKS, *sorted(set(res.tables) - set(NETWORKS))]:
        analyses = sorted(res.tables.get(network, {}))
        rows.append([network, NETWORK_TITLE.get(network, network), ", ".join(analyses) or "none"])
    snaps = sorted(res.snapshots)
    rows.append(["snapshots", "pretraining snapshots",
                 f"{len(snaps)} snapshots ({', '.join(map(str, snaps))})" if snaps else "none"])
    return "\n".join(["## Networks and the results loaded", "",
                      _md_table(["network", "paper's name", "results"], rows), ""])


# ---------------------------------------------------------------- html


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}td{white-space:nowrap}blockquote{background:#fff4e5;border-left:4px solid #f90;
margin:0;padding:.5em 1em}img{max-width:100%}code{background:#f6f6f6}"""


def to_html(markdown_text: str, base: Path, title: str) -> str:
    """Markdown -> one HTML file; every local image is inlined as a base64 data URI."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)

    def inline(match: re.Match[str]) -> str:
        path = base / match.group(1)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


# ---------------------------------------------------------------- W&B


def log_wandb(tables: list[Table], claims: list[ClaimResult], out: Path, res: Results) -> None:
    """One W&B run (offline unless configured otherwise) with every table, the claims and figures."""
    import wandb

    run = wandb.init(project="cnnft", job_type="report", dir=str(out), mode="offline",
                     group=f"report-{res.info.get('scale', 'unknown')}", config=dict(res.info),
                     tags=["report", str(res.info.get("scale", "unknown"))], reinit="finish_previous")
    try:
        for t in tables:
            run.log({f"report/{t.key}": wandb.Table(columns=[t.corner, *t.columns], data=t.text_rows())})
        run.log({"report/claims": wandb.Table(
            columns=["claim", "this run", "paper"],
            data=[[c.claim.text, f"{ClaimResult.word(c.ours[0])}: {c.ours[1]}",
                   f"{ClaimResult.word(c.paper[0])}: {c.paper[1]}"] for c in claims])})
        for png in sorted((out / "figures").glob("figure*.png")):
            run.log({f"report/{png.stem}": wandb.Image(str(png))})
    finally:
        run.finish()


# ---------------------------------------------------------------- entry


def build_report(dirs: Sequence[str | Path], out: str | Path, *, wandb: bool = False) -> Path:
    """Load ``dirs``, write the report into ``out``; return the path of ``report.md``."""
    res = load_results(list(dirs))
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    tables = build_tables(res)
    claims = evaluate_claims(res)
    missing = missing_results(res, tables)
    for t in tables:
        write_table_csv(t, out / "tables")
    margins = margin_rows(res)
    write_margins(margins, out / "tables")
    parts = [header_md(res), claims_md(claims, str(res.info.get("model") or "caffenet")),
             baselines_md(res, margins), "## Tables", "",
             *(table_md(t) for t in tables),
             figures_md(res, out), networks_md(res), status_md(res, missing)]
    text = "\n".join(parts)
    md = atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    html = to_html(text, out, f"cnnft report ({res.info.get('scale', 'unknown')} scale)")
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(html))
    if wandb:
        try:
            log_wandb(tables, claims, out, res)
        except Exception:  # the files are the report; W&B is a copy
            log.exception("W&B logging of the report failed; the files in %s are complete", out)
    log.info("report: %s (%d of %d table cells with our numbers; %d results missing)", md,
             sum(t.filled() for t in tables), sum(len(t.rows) * len(t.columns) for t in tables), len(missing))
    return md
