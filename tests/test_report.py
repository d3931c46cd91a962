"""The report from stored results: every table cell it claims, n/a elsewhere, paper numbers,
claims, figures, a self-contained HTML, and ``cnnft-report`` on directories."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnft.analysis import AnalysisContext, write_table
from cnnft.data.voc import VOC_CLASSES
from cnnft.errors import DataError
from cnnft.report import build_report
from cnnft.report.claims import CLAIMS, PaperNumbers, evaluate_claims
from cnnft.report.load import load_results
from cnnft.report.paper import LAYERS, layer_roles, paper_tables
from cnnft.report.tables import build_tables, missing_results

NETS = ("pretrained", "finetune_all", "finetune_fc", "fifty_fifty", "random")
SNAPSHOTS = (10, 30, 50, 70, 90, 100, 190, 210, 450, 620)


def _write(folder: Path, name: str, rows: list[dict], summary: dict | None = None) -> None:
    ctx = AnalysisContext(output_dir=folder, voc_root=folder, model_key="fake", input_size=67,
                          context_pad=5, mean=(0.0, 0.0, 0.0))
    write_table(ctx, name, rows, summary)


def _ap_rows(layers, ablations, base: float, classes=VOC_CLASSES) -> list[dict]:
    rows = []
    for i, layer in enumerate(layers):
        for j, ab in enumerate(ablations):
            aps = [min(1.0, base + 0.05 * i - 0.02 * j + 0.001 * c) for c in range(len(classes))]
            rows += [{"layer": layer, "ablation": ab, "class": cls, "ap": ap}
                     for cls, ap in zip(classes, aps)]
            rows.append({"layer": layer, "ablation": ab, "class": "mAP", "ap": sum(aps) / len(aps)})
    return rows


def fake_root(root: Path, *, analyses: tuple[str, ...] = ("probe_cls", "probe_gtbox", "detection",
                                                          "filter_entropy", "unit_count")) -> Path:
    """A cnnft-reproduce root with results for every analysis in the team's schemas."""
    base = {"pretrained": 0.3, "finetune_all": 0.35, "finetune_fc": 0.33, "fifty_fifty": 0.32, "random": 0.1}
    for net in NETS:
        out = root / "analyze" / net
        if "probe_cls" in analyses:
            abl = (["unroll", "shuffle", "spatial_max", "binarize", "binarize_loc"]
                   if net == "pretrained" else ["unroll"])
            _write(out, "probe_cls", _ap_rows(LAYERS, abl, base[net]))
        if "probe_gtbox" in analyses:
            _write(out, "probe_gtbox", _ap_rows(LAYERS, ["unroll"], base[net] + 0.1))
        if "detection" in analyses and net != "random":
            abl = (["unroll", "spatial_max", "binarize", "binarize_loc"]
                   if net == "finetune_all" else ["unroll"])
            _write(out, "detection", _ap_rows(["pool5", "relu6", "relu7"], abl, base[net] - 0.1))
        if "filter_entropy" in analyses and net in ("pretrained", "finetune_all"):
            shift = {"relu6": 0.5, "relu7": 0.6} if net == "finetune_all" else {}
            rows = [{"layer": layer, "filter": f, "aue": 3.0 - 0.1 * i - shift.get(layer, 0.0) + 0.01 * f}
                    for i, layer in enumerate(LAYERS) for f in range(8)]
            _write(out, "filter_entropy", rows, {f"filter_entropy/{layer}/mean_aue":
                                                 sum(r["aue"] for r in rows if r["layer"] == layer) / 8
                                                 for layer in LAYERS})
            _write(out, "filter_entropy_topk", [{"layer": layer, "k": k, "mean_aue": 2.0 + 0.05 * k}
                                                for layer in LAYERS for k in (1, 4, 8)])
        if "unit_count" in analyses and net in ("pretrained", "finetune_all"):
            _write(out, "unit_count", [{"class": c, "k": k, "ap": 0.1 * k ** 0.5} for c in VOC_CLASSES
                                       for k in (1, 2, 4, 8, 16, 64)])
            _write(out, "unit_count_summary", [{"class": c, "full_ap": 0.8, "k50": 3, "k90": 12 if net ==
                                                "pretrained" else 10} for c in VOC_CLASSES])
        (out / "figures").mkdir(parents=True, exist_ok=True)
    for it in SNAPSHOTS:
        _write(root / "analyze" / "snapshots" / f"iter_{it:07d}", "probe_cls",
               _ap_rows(LAYERS, ["unroll"], 0.2 + it / 2000))
    pre = root / "pretrain"
    (pre / "snapshots").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for it in (10, 30, 450, 620):
        torch.save({"conv1.weight": torch.randn(24, 3, 11, 11, generator=gen)},
                   pre / "snapshots" / f"iter_{it:07d}.ckpt")
    (pre / "csv").mkdir()
    with (pre / "csv" / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/top1"])
        for step in range(10, 630, 10):
            w.writerow([0, step, 3.0 - step / 500, ""])
            if step % 100 == 0:
                w.writerow([0, step, "", step / 1000])
    (root / "reproduce.json").write_text(json.dumps({
        "scale": "demo", "imagenet_root": "data/demo/imagenet", "voc_root": "data/demo/VOC2007",
        "overrides": [], "units": {"pretrain": {"status": "done", "wall_s": 12.0}}}))
    return root


def _section(md: str, title: str) -> str:
    start = md.index(f"### {title}")
    end = md.find("\n### ", start + 1)
    return md[start:end if end > 0 else None]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report built from results of every analysis (module-scoped: drawing takes a while)."""
    tmp = tmp_path_factory.mktemp("full")
    build_report([fake_root(tmp / "root")], tmp / "report")
    return tmp


def test_full_results_fill_every_cell(full: Path) -> None:
    tmp_path, root = full, full / "root"
    md = (tmp_path / "report" / "report.md").read_text()
    # scale warning and header
    assert "**Scale: demo.**" in md and "data/demo/VOC2007" in md and "git commit" in md
    # every cell of Tables 1-4, 6-8 has our number; Table 5 only misses crop-1 (no such ablation)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 6", "Table 7", "Table 8"):
        assert "n/a (" not in _section(md, title), title
    t5 = _section(md, "Table 5")
    assert re.search(r"\| crop-1 \| n/a \(48\.2\)", t5) and t5.count("n/a (") == 21
    # ours (paper): pool-5 gtbox of alex-net = 100 * mean AP of our fake rows, paper 79.1
    res = load_results([root])
    ours = res.ap("probe_gtbox", "pretrained", "pool5")
    assert f"| pool-5 | {ours:.1f} (79.1) |" in md
    # Table 7 columns map the paper's iterations onto our snapshots (310K -> 620, 15K -> 30)
    assert "15K (ours 30)" in md and "310K (ours 620)" in md
    # csv per table, figures 1, 4, 5
    for n in range(1, 9):
        assert (tmp_path / "report" / "tables" / f"table{n}.csv").is_file()
    rows = list(csv.DictReader((tmp_path / "report" / "tables" / "table1.csv").open()))
    assert rows[0] == {"Layer": "pool-1", "column": "A-Net", "ours": rows[0]["ours"], "paper": "43.2"}
    for fig in ("figure1_filter_entropy", "figure4_unit_count", "figure5_training"):
        assert (tmp_path / "report" / "figures" / f"{fig}.png").stat().st_size > 5000, fig
    assert "nothing: every table has the results it reads" in md


def test_html_is_self_contained(full: Path) -> None:
    html = (full / "report" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=\"figures" not in html and "(79.1)" in html


def test_missing_results_show_na_and_are_listed(tmp_path: Path) -> None:
    root = fake_root(tmp_path / "root", analyses=("probe_cls",))
    md = build_report([root], tmp_path / "report").read_text()
    t1 = _section(md, "Table 1")
    assert t1.count("n/a (") == 14 and "| pool-1 | n/a (43.2) | n/a (43.2) |" in t1
    assert "`detection`: no results for" in md and "`probe_gtbox`: no results for" in md
    assert "figure1_filter_entropy: n/a" in md
    # Table 4 is still filled: it reads probe_cls only
    assert "n/a (" not in _section(md, "Table 4").replace("n/a (-)", "")


def test_empty_directory_renders_all_na(tmp_path: Path) -> None:
    (tmp_path / "root" / "analyze").mkdir(parents=True)
    res = load_results([tmp_path / "root"])
    tables = build_tables(res)
    assert all(t.filled() == 0 for t in tables)
    assert len(missing_results(res, tables)) >= 10
    assert all(c.ours[0] is None for c in evaluate_claims(res))
    md = build_report([tmp_path / "root"], tmp_path / "report").read_text()
    assert "(65.6)" in md and "(54.1)" in md  # the paper's numbers are always there


def test_paper_numbers_come_from_the_package() -> None:
    t = paper_tables()
    assert t["table1_gtbox_classification"]["pool-5"] == {"alexnet": 79.1, "finetuned": 82.2}
    assert t["table7_snapshots_image_classification"]["iterations"][-1] == "310K"
    shipped = Path(__file__).resolve().parents[1] / "cnnft" / "paper" / "tables.json"
    assert json.loads(shipped.read_text()) == t


def test_claims_on_fake_results_and_on_the_paper(tmp_path: Path) -> None:
    res = load_results([fake_root(tmp_path / "root")])
    results = {c.claim.check.__name__: c for c in evaluate_claims(res)}
    assert len(results) == len(CLAIMS)
    assert all(c.ours[0] is not None for c in results.values()), [
        (k, c.ours) for k, c in results.items() if c.ours[0] is None]
    # fake AuE: fine-tuning shifts relu6/relu7 by 0.5/0.6 and nothing else
    assert results["fc_aue_changes_most"].ours[0] is True
    assert "relu7 0.600" in results["fc_aue_changes_most"].ours[1]
    # fake gtbox: +5 points at every layer -> relu-7 gain == pool-5 gain (holds), not more at fc
    assert results["gtbox_gain_relu7_vs_pool5"].ours[0] is True
    assert results["gtbox_gain_fc_vs_low"].ours[0] is False
    # fake detection: fc-tune 0.33 vs all 0.35 vs alex-net 0.30 -> 60% of the gain: no
    verdict, numbers = results["fc_tuning_recovers_detection"].ours
    assert verdict is False and "60% of the gain" in numbers
    # on the paper's own numbers every claim it has numbers for holds
    paper = PaperNumbers()
    verdicts = {c.check.__name__: c.check(paper) for c in CLAIMS}
    assert verdicts["fc_aue_changes_most"][0] is None  # the paper gives no AuE numbers
    assert all(v[0] is True for k, v in verdicts.items() if k != "fc_aue_changes_most"), verdicts


def test_cnnft_report_cli_on_run_directories(tmp_path: Path) -> None:
    """Arbitrary run directories: NAME=DIR for one network, a reproduce root for the rest."""
    root = fake_root(tmp_path / "root", analyses=("probe_cls",))
    other = tmp_path / "sweep" / "1_freeze=fc"
    _write(other, "probe_gtbox", _ap_rows(["pool5"], ["unroll"], 0.5))
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "-m", "cnnft.report", str(root), f"finetune_fc={other}",
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "| pool-5 | n/a (79.1) | n/a (82.2) |" in md  # gtbox of alex-net / FT: not given
    t2 = _section(md, "Table 2")
    assert re.search(r"\| pool-5 \|( [^|]+ \|){5} 5\d\.\d \(79\.1\) \|", t2), t2
    # the sweep directory alone: the network comes from its name
    res = load_results([tmp_path / "sweep"])
    assert res.has("finetune_fc", "probe_gtbox")


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_results([tmp_path / "nowhere"])
    broken = tmp_path / "run" / "results"
    broken.mkdir(parents=True)
    (broken / "probe_cls.json").write_text("{not json")
    with pytest.raises(DataError, match=r"probe_cls\.json"):
        load_results([tmp_path / "run"])
    proc = subprocess.run([sys.executable, "-m", "cnnft.report", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nowhere" in proc.stderr


@pytest.mark.parametrize(("tasks", "title"), [
    (("gtbox", "gtbox"), "GT-box classification"), (("image", "image"), "image classification"),
    (("image", "gtbox"), "GT-box classification / image classification"),
    ((None, None), "classification (task not recorded)")])
def test_figure4_and_table6_name_the_unit_count_task_that_ran(tmp_path: Path, tasks, title) -> None:
    from cnnft.report.figures import unit_count_task
    from cnnft.report.tables import table6

    for net, task in zip(("pretrained", "finetune_all"), tasks):
        out = tmp_path / "analyze" / net
        summary = {} if task is None else {"task": task}
        _write(out, "unit_count", [{"class": c, "k": k, "ap": 0.5} for c in VOC_CLASSES for k in (1, 8)],
               summary)
        _write(out, "unit_count_summary", [{"class": c, "full_ap": 0.5, "k50": 1, "k90": 8}
                                           for c in VOC_CLASSES], summary)
    res = load_results([tmp_path])
    assert unit_count_task(res) == title
    assert table6(res).title.endswith(f"ours: {title})")


def test_baselines_section_puts_the_control_next_to_random() -> None:
    from cnnft.report.build import baselines_md
    from cnnft.report.load import Results

    def probe(aps: dict[str, float]) -> dict:
        return {"rows": [{"layer": layer, "ablation": "unroll", "class": "mAP", "ap": ap}
                         for layer, ap in aps.items()]}

    res = Results(tables={
        "pretrained": {"probe_cls": probe({"pool5": 0.6, "relu7": 0.55}),
                       "probe_gtbox": probe({"pool5": 0.8})},
        "random": {"probe_cls": probe({"pool5": 0.3, "relu7": 0.2})},
        "control": {"lowlevel_control": {"rows": [
            {"task": "cls", "features": "colour", "class": "mAP", "ap": 0.14},
            {"task": "gtbox", "features": "colour", "class": "mAP", "ap": 0.078},
            {"task": "gtbox", "features": "gradient", "class": "aero", "ap": 0.9}]}}})
    md = baselines_md(res)
    assert "| alex-net | 60.0 | 55.0 | 80.0 | n/a |" in md
    assert "| random init | 30.0 | 20.0 | n/a | n/a |" in md
    assert "| low-level control: colour histograms | 14.0 | 14.0 | 7.8 | 7.8 |" in md
    assert "| low-level control: gradient histograms | n/a | n/a | n/a | n/a |" in md
    assert baselines_md(Results()) == ""


VGG16_TAPS = ["features.4", "features.9", "features.16", "features.23", "features.30", "classifier.1",
              "classifier.4"]


def test_layer_roles_of_other_models() -> None:
    """Seven probe layers take the paper's seven roles in order; fewer take pool5 (the unit
    layer) and relu7 (the last probe layer after it) only; CaffeNet keeps its names."""
    assert layer_roles(list(LAYERS), "pool5") == {layer: layer for layer in LAYERS}
    assert layer_roles(VGG16_TAPS, "features.30") == dict(zip(LAYERS, VGG16_TAPS))
    resnet = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert layer_roles(resnet, "layer4") == {"pool5": "layer4", "relu7": "avgpool"}
    assert layer_roles(["block", "pool"], "pool") == {"pool5": "pool"}


def test_another_models_layers_fill_the_paper_rows(tmp_path: Path) -> None:
    """A VGG16 run's rows (its own layer names) land in the rows of the layer whose role they
    play; the header names the mapping and the rows keep their own name as model_layer."""
    root = tmp_path / "root"
    out = root / "analyze" / "pretrained"
    _write(out, "probe_cls", _ap_rows(VGG16_TAPS, ["unroll", "shuffle"], 0.3))
    _write(out, "probe_gtbox", _ap_rows(VGG16_TAPS, ["unroll"], 0.4))
    (root / "pretrain" / "snapshots").mkdir(parents=True)
    for it in (10, 620):  # a snapshot of a TappedNet: the model's names under net.module.
        torch.save({"cnnft": {"arch": {"family": "torchvision", "name": "vgg16"}},
                    "state_dict": {"net.module.features.0.weight": torch.randn(8, 3, 3, 3)}},
                   root / "pretrain" / "snapshots" / f"iter_{it:07d}.ckpt")
    (root / "reproduce.json").write_text(json.dumps({
        "scale": "demo", "model": "vgg16", "probe_layers": VGG16_TAPS, "unit_layer": "features.30",
        "first_conv": "features.0", "units": {}}))
    res = load_results([root])
    mean = {r["model_layer"]: 100 * r["ap"] for r in res.rows("pretrained", "probe_gtbox")
            if r["class"] == "mAP"}
    assert res.ap("probe_gtbox", "pretrained", "pool5") == pytest.approx(mean["features.30"])
    assert res.ap("probe_cls", "pretrained", "relu7", "shuffle") is not None
    assert res.model_layer("pool5") == "features.30"
    build_report([root], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "pool-5 = `features.30`" in md and "relu-7 = `classifier.4`" in md
    assert f"| pool-5 | {mean['features.30']:.1f} (79.1) |" in _section(md, "Table 1")
    assert "could not be drawn" not in md  # Figure 5: the model's first convolution
    assert (tmp_path / "report" / "figures" / "figure5_training.png").stat().st_size > 5000
    t4 = _section(md, "Table 4")
    assert re.search(r"\| pool-5 \| [0-9.]+ \(\d+\.\d\) \| [0-9.]+ \(", t4), t4


def test_a_snapshot_without_the_first_convolution_is_named(tmp_path: Path) -> None:
    from cnnft.report.figures import _conv1_grid

    path = tmp_path / "iter_0000010.ckpt"
    torch.save({"cnnft": {}, "state_dict": {"net.module.stem.weight": torch.zeros(4, 3, 3, 3)}}, path)
    with pytest.raises(DataError, match=r"iter_0000010.ckpt has no weights of the first convolution "
                                        r"'features.0' \(model.first_conv\)"):
        _conv1_grid(path, "features.0")
    assert _conv1_grid(path, "stem").ndim == 3  # the model's names under module.
