"""Region proposals: R-CNN's .mat files, selective search in R-CNN's fast mode, the config group,
difficult objects in fine-tuning windows and corrupt images in the selective-search step."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from cnnft.data.proposals import (
    OPENCV_FAST,
    ProposalSettings,
    ProposalSource,
    compute_proposals,
    read_proposal_file,
    selective_search,
)
from cnnft.data.voc import load_voc
from cnnft.errors import ConfigError, CorruptImageError, DataError
from cnnft.train import build


@dataclass
class Im:
    image_id: str
    width: int
    height: int
    path: Path = Path("unused.jpg")


IMAGES = [Im("000005", 500, 375), Im("000007", 300, 200)]
#: R-CNN's layout: 1-based, pixel-inclusive [y1 x1 y2 x2]
RCNN_BOXES = [np.array([[1, 1, 375, 500], [10, 20, 110, 220]], np.uint16),
              np.array([[5, 7, 9, 300]], np.uint16)]
#: the same boxes in cnnft's 0-based half-open [x1, y1, x2, y2)
CNNFT_BOXES = [np.array([[0, 0, 500, 375], [19, 9, 220, 110]], np.float32),
               np.array([[6, 4, 300, 9]], np.float32)]


def cells(items: list) -> np.ndarray:
    """A MATLAB cell array (1 x N) as scipy.io writes it: an object array."""
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def write_v5(path: Path, ids: list[str], boxes: list[np.ndarray]) -> Path:
    scipy.io.savemat(path, {"images": cells(ids), "boxes": cells(boxes)}, format="5")
    return path


def write_v73(path: Path, ids: list[str], boxes: list[np.ndarray]) -> Path:
    """MATLAB v7.3 layout: HDF5, arrays transposed, cells as object references into #refs#."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, values in (("images", ids), ("boxes", boxes)):
            out = np.empty((len(values), 1), dtype=h5py.ref_dtype)  # MATLAB 1 x N, transposed
            for i, v in enumerate(values):
                if isinstance(v, str):
                    ds = refs.create_dataset(f"{name}{i}", data=np.array([[ord(c)] for c in v], np.uint16))
                    ds.attrs["MATLAB_class"] = np.bytes_("char")
                else:
                    ds = refs.create_dataset(f"{name}{i}", data=np.asarray(v, np.float64).T)
                    ds.attrs["MATLAB_class"] = np.bytes_("double")
                out[i, 0] = ds.ref
            f.create_dataset(name, data=out).attrs["MATLAB_class"] = np.bytes_("cell")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  6 00:00:00 2014 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:  # MATLAB's 128-byte header in the user block
        f.write(text.ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    return path


@pytest.mark.parametrize("writer", [write_v5, write_v73], ids=["v5", "v7.3"])
def test_rcnn_file_boxes_are_converted(writer, tmp_path: Path) -> None:
    path = writer(tmp_path / "voc_2007_test.mat", ["000001", "000007", "000005"],
                  [np.array([[1, 1, 2, 2]]), *RCNN_BOXES[::-1]])
    boxes = read_proposal_file(path, IMAGES)
    assert list(boxes) == ["000005", "000007"]
    for im, want in zip(IMAGES, CNNFT_BOXES, strict=True):
        np.testing.assert_array_equal(boxes[im.image_id], want)
        assert boxes[im.image_id].dtype == np.float32
    # widths equal R-CNN's inclusive ones: x2 - x1 == x2' - x1' + 1
    assert boxes["000005"][1, 2] - boxes["000005"][1, 0] == 220 - 20 + 1
    assert len(read_proposal_file(path, IMAGES, max_boxes=1)["000005"]) == 1


def test_file_source_fills_in_the_split_or_reads_a_folder(tmp_path: Path) -> None:
    write_v5(tmp_path / "voc_2007_test.mat", ["000005", "000007"], RCNN_BOXES)
    for path in (str(tmp_path / "voc_2007_{split}.mat"), str(tmp_path)):
        source = ProposalSource.from_config({"source": "file", "path": path})
        boxes, skipped = source.boxes(IMAGES, "test")
        np.testing.assert_array_equal(boxes["000007"], CNNFT_BOXES[1])
        assert skipped == []
    with pytest.raises(DataError, match=re.escape(f"proposals file {tmp_path / 'voc_2007_trainval.mat'} "
                                                  "does not exist")):
        ProposalSource.from_config({"source": "file", "path": str(tmp_path)}).boxes(IMAGES, "trainval")


@pytest.mark.parametrize("writer", [write_v5, write_v73], ids=["v5", "v7.3"])
def test_rcnn_file_errors_name_the_file_and_the_image(writer, tmp_path: Path) -> None:
    path = writer(tmp_path / "a.mat", ["000005"], RCNN_BOXES[:1])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} does not cover the split: 1 of 2 images "
                                        r"have no boxes \(first: 000007\)"):
        read_proposal_file(path, IMAGES)
    path = writer(tmp_path / "b.mat", ["000005", "000007"], [RCNN_BOXES[0], np.ones((2, 3))])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: boxes of image 000007 have shape "
                                        r"\(2, 3\).*expected \[N, 4\]"):
        read_proposal_file(path, IMAGES)
    outside = np.array([[1, 1, 10, 10], [1, 1, 201, 300]])  # y2 = 201 > height 200
    path = writer(tmp_path / "c.mat", ["000005", "000007"], [RCNN_BOXES[0], outside])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: image 000007 box 2 .* is not inside "
                                        r"the 300x200 image \(1 such boxes\)"):
        read_proposal_file(path, IMAGES)


def test_rcnn_file_without_the_variables(tmp_path: Path) -> None:
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"boxes": cells(RCNN_BOXES)})
    with pytest.raises(DataError, match=r"x\.mat has no variable\(s\) \['images'\]"):
        read_proposal_file(path, IMAGES)


def test_settings_are_validated() -> None:
    cases = [({"source": "ss"}, r"proposals.source='ss'; expected one of \['selective_search', 'file'\]"),
             ({"source": "file"}, "proposals.source=file needs proposals.path"),
             ({"path": "/x.mat"}, "proposals.path='/x.mat' is set but proposals.source=selective_search"),
             ({"color_spaces": ["hsv", "yuv"]}, r"proposals.color_spaces=\['hsv', 'yuv'\]"),
             ({"strategies": [["color", "shape"]]}, r"proposals.strategies=\[\['color', 'shape'\]\]"),
             ({"ks": [0]}, r"proposals.ks=\[0\]"), ({"max_boxes": 0}, "proposals.max_boxes=0"),
             ({"mode": "fast"}, r"proposals: unknown key\(s\) \['mode'\]")]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            ProposalSource.from_config(cfg)


def test_selective_search_defaults_are_rcnn_fast_mode(data_dir: Path) -> None:
    """R-CNN's fast mode (k 50/100, min segment k) vs OpenCV's preset, which the explicit
    ``OPENCV_FAST`` settings reproduce box for box."""
    import cv2

    from cnnft.data.images import load_rgb
    from cnnft.data.proposals import _seed_c_rand

    image = load_rgb(load_voc(data_dir / "demo" / "VOC2007", "test")[0].path)
    s = ProposalSettings()
    assert (s.ks, s.min_segment, s.sigma, s.color_spaces, s.max_boxes) == ((50, 100), None, 0.8,
                                                                           ("hsv", "lab"), None)
    _seed_c_rand(0)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))
    ss.switchToSelectiveSearchFast()
    rects = ss.process().astype(np.float32)
    preset = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)
    explicit = selective_search(image, ProposalSettings(min_size=0, **OPENCV_FAST))
    np.testing.assert_array_equal(explicit, preset)

    rcnn = selective_search(image, ProposalSettings(min_size=10))
    assert len(rcnn) > len(preset)  # smaller segments: more regions
    assert len(np.unique(rcnn, axis=0)) == len(rcnn)  # duplicates removed
    assert ((rcnn[:, 2:] - rcnn[:, :2]) >= 10).all()
    assert len(selective_search(image, ProposalSettings(min_size=10, max_boxes=7))) == 7
    assert ProposalSettings().key() != ProposalSettings(**OPENCV_FAST).key()


def test_config_group_is_shared_by_finetuning_and_detection(tiny_cfg) -> None:
    from omegaconf import OmegaConf

    cfg = tiny_cfg("stage=finetune", "analyses=[detection]", "proposals.max_boxes=50")
    ft = OmegaConf.to_container(cfg.datamodule.proposals, resolve=True)
    assert ft == OmegaConf.to_container(cfg.analyses.detection.proposals.cfg, resolve=True)
    source = build(cfg.analyses.detection.proposals)  # Hydra builds detection's ProposalSource
    assert isinstance(source, ProposalSource) and source.settings.max_boxes == 50
    assert (source.settings.ks, source.workers, source.cache_dir) == ((50, 100), 2,
                                                                     Path(ft["cache_dir"]))
    assert (ft["source"], ft["ks"], ft["min_size"], ft["max_boxes"]) == ("selective_search", [50, 100],
                                                                          10, 50)
    assert cfg.datamodule.use_difficult is True
    cfg = tiny_cfg("stage=finetune", "proposals=file", "proposals.path=/ss")
    assert (cfg.datamodule.proposals.source, cfg.datamodule.proposals.max_boxes) == ("file", None)


def tiny_rcnn_files(voc: Path, folder: Path, drop: str | None = None) -> dict[str, np.ndarray]:
    """R-CNN files for the tiny VOC's splits: per image two boxes (1-based [y1 x1 y2 x2])."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {}
    for split in ("trainval", "test"):
        images = [im for im in load_voc(voc, split) if im.image_id != drop]
        boxes = [np.array([[1, 1, im.height, im.width], [2, 3, 20, 30]]) for im in images]
        write_v5(folder / f"voc_2007_{split}.mat", [im.image_id for im in images], boxes)
        want |= {im.image_id: np.array([[0, 0, im.width, im.height], [2, 1, 30, 20]], np.float32)
                 for im in images}
    return want


def test_finetuning_windows_from_rcnn_files(data_dir: Path, tmp_path: Path) -> None:
    from cnnft.data.datamodules import VOCWindowsDataModule

    voc = data_dir / "demo" / "VOC2007"
    want = tiny_rcnn_files(voc, tmp_path / "ss")
    dm = VOCWindowsDataModule(str(voc), proposals={"source": "file", "path": str(tmp_path / "ss")},
                              batch_size=8, fg_per_batch=2, crop=67, context_pad=5, num_workers=0,
                              val_batches=1)
    dm.setup()
    train = dm._sets["train"]
    images = load_voc(voc, "trainval")
    first = train.boxes[train.image_index == 0]
    gt = images[0].boxes  # difficult included (R-CNN): every ground-truth box is a window
    np.testing.assert_array_equal(first, np.concatenate([gt, want[images[0].image_id]]))
    assert dm.skipped_images == {"trainval": [], "test": []}
    assert len(dm._sets["train"].boxes) == sum(len(im.boxes) + 2 for im in images)  # nothing dropped


def test_finetuning_with_a_file_missing_an_image_fails_before_writing(tiny_cfg, data_dir: Path,
                                                                       tmp_path: Path) -> None:
    from cnnft.train import train

    voc = data_dir / "demo" / "VOC2007"
    victim = load_voc(voc, "test")[3].image_id
    tiny_rcnn_files(voc, tmp_path / "ss", drop=victim)
    out = tmp_path / "run"
    cfg = tiny_cfg("stage=finetune", f"pretrained={tmp_path / 'never_read.ckpt'}", "proposals=file",
                   f"proposals.path={tmp_path / 'ss'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   output_dir=out)
    with pytest.raises(DataError, match=rf"voc_2007_test\.mat does not cover the split: 1 of 24 images "
                                        rf"have no boxes \(first: {victim}\)"):
        train(cfg)
    assert not out.exists() or not any(out.rglob("*"))
    assert not (tmp_path / "cache").exists()


def test_difficult_objects_are_foreground_windows_by_default() -> None:
    """R-CNN's window file labels windows against every ground-truth box, difficult included."""
    import inspect

    from cnnft.data.datamodules import VOCWindowsDataModule, build_windows
    from cnnft.data.voc import VOCImage

    im = VOCImage("x", Path("x.jpg"), 100, 100, np.array([[0, 0, 40, 40], [50, 50, 100, 100]], np.float32),
                  np.array([3, 7]), np.array([False, True]), np.array([False, False]))
    props = {"x": np.array([[52, 52, 100, 100], [0, 60, 20, 100]], np.float32)}
    assert inspect.signature(VOCWindowsDataModule).parameters["use_difficult"].default is True
    _, boxes, labels = build_windows([im], props, fg_threshold=0.5, use_difficult=True)
    np.testing.assert_array_equal(labels, [4, 8, 8, 0])  # the difficult box and its match: class 7
    _, boxes, labels = build_windows([im], props, fg_threshold=0.5, use_difficult=False)
    np.testing.assert_array_equal(labels, [4, 0])  # neither a window nor a labelled match
    assert len(boxes) == 2


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:400])


def test_corrupt_image_skipped_in_selective_search(data_dir: Path, tmp_path: Path) -> None:
    voc = tmp_path / "VOC2007"
    shutil.copytree(data_dir / "demo" / "VOC2007", voc)
    images = load_voc(voc, "test")[:3]
    truncate(images[1].path)
    pairs = [(im.image_id, im.path) for im in images]
    s = ProposalSettings(min_size=10)
    with pytest.raises(CorruptImageError, match=rf"cannot decode image .*{images[1].image_id}\.jpg"):
        compute_proposals(pairs, tmp_path / "cache", s, workers=1, progress=False)
    boxes, skipped = compute_proposals(pairs, tmp_path / "cache", s, workers=1, progress=False,
                                       skip_corrupt=True, with_skipped=True)
    assert skipped == [images[1].image_id] and list(boxes) == [images[0].image_id, images[2].image_id]


def test_finetuning_skips_a_truncated_voc_jpeg(tiny_cfg, data_dir: Path, tmp_path: Path) -> None:
    """data.skip_corrupt=true: the selective-search step leaves the image out, logs and counts it."""
    import csv

    from cnnft.train import train

    voc = tmp_path / "VOC2007"
    shutil.copytree(data_dir / "demo" / "VOC2007", voc)
    victim = load_voc(voc, "trainval")[2]
    truncate(victim.path)
    pre = tmp_path / "pretrain"
    train(tiny_cfg("recipe.pretrain.max_steps=1", "recipe.pretrain.snapshots=[]", output_dir=pre))
    base = ("stage=finetune", f"pretrained={pre / 'checkpoints' / 'last.ckpt'}", "data.generate_demo=false",
            f"data.voc_root={voc}", f"data.imagenet_root={data_dir / 'demo' / 'imagenet'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "proposals.workers=1", "recipe.finetune.max_steps=2")
    with pytest.raises(CorruptImageError, match=rf"{victim.image_id}\.jpg"):
        train(tiny_cfg(*base, output_dir=tmp_path / "a"))
    _, objs = train(tiny_cfg(*base, "data.skip_corrupt=true", output_dir=tmp_path / "b"))
    dm = objs["datamodule"]
    assert dm.skipped_images == {"trainval": [victim.image_id], "test": []}
    assert victim.path not in {Path(p) for p in dm._sets["train"].image_paths}
    with open(next((tmp_path / "b").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["data/skipped_images"]) for r in rows if r.get("data/skipped_images")] == [1.0]
