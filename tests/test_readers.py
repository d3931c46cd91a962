"""The ImageNet / VOC readers and the image decoder reject bad input, naming the culprit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnft.data.imagenet import scan_imagenet
from cnnft.data.images import load_rgb
from cnnft.data.voc import load_voc, parse_annotation, read_class_labels, read_image_set
from cnnft.errors import CorruptImageError, DataError

SIZE = "<size><width>100</width><height>80</height><depth>3</depth></size>"


def _obj(name: str = "dog", box: tuple[str, ...] = ("1", "1", "100", "80"), extra: str = "") -> str:
    coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name>{extra}<bndbox>{coords}</bndbox></object>"


def _voc_root(
    tmp_path: Path, objects: str = "", size: str = SIZE, image_id: str = "000001"
) -> Path:
    """A one-image VOC2007 tree whose annotation holds ``objects``."""
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    xml = f"<annotation><filename>{image_id}.jpg</filename>{size}{objects}</annotation>"
    (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"{image_id}\n")
    return root


def _xml(root: Path) -> Path:
    return root / "Annotations" / "000001.xml"


def _jpeg(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


# ---------------------------------------------------------------- VOC


def test_parse_annotation_box_convention(tmp_path: Path) -> None:
    objects = _obj("dog", ("1", "1", "10", "20")) + _obj(
        "person", ("10.6", "2", "100", "80"), "<difficult>1</difficult><truncated>1</truncated>"
    )
    image = parse_annotation(_xml(_voc_root(tmp_path, objects)))
    assert image.image_id == "000001" and (image.width, image.height) == (100, 80)
    assert image.path == tmp_path / "VOC2007" / "JPEGImages" / "000001.jpg"
    assert image.boxes.dtype == np.float32 and image.boxes.tolist() == [
        [0, 0, 10, 20],
        [10, 1, 100, 80],
    ]
    assert image.labels.tolist() == [11, 14] and image.labels.dtype == np.int64
    assert image.difficult.tolist() == [False, True] and image.truncated.tolist() == [False, True]


def test_annotation_without_objects(tmp_path: Path) -> None:
    image = parse_annotation(_xml(_voc_root(tmp_path)))
    assert image.boxes.shape == (0, 4) and image.labels.shape == (0,)


def test_box_outside_image(tmp_path: Path) -> None:
    xml = _xml(_voc_root(tmp_path, _obj("dog") + _obj("cat", ("5", "5", "101", "50"))))
    with pytest.raises(
        DataError, match=re.escape(f"{xml}: object 1 (cat) box (xmin=5, ymin=5, xmax=101")
    ) as err:
        parse_annotation(xml)
    assert "outside the 100x80 image; expected" in str(err.value)


def test_box_starting_at_zero(tmp_path: Path) -> None:
    xml = _xml(_voc_root(tmp_path, _obj("cat", ("0", "5", "10", "50"))))
    with pytest.raises(DataError, match="xmin=0.*outside.*expected 1 <= xmin"):
        parse_annotation(xml)


def test_empty_box(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"object 0 \(cat\) box .* is empty; expected xmin <= xmax"):
        parse_annotation(_xml(_voc_root(tmp_path, _obj("cat", ("50", "5", "40", "50")))))


def test_unknown_class(tmp_path: Path) -> None:
    xml = _xml(_voc_root(tmp_path, _obj("unicorn")))
    with pytest.raises(
        DataError, match=re.escape(f"{xml}: object 0 (unicorn) has unknown class 'unicorn'")
    ) as err:
        parse_annotation(xml)
    assert "expected one of aeroplane, bicycle" in str(err.value)


def test_malformed_xml(tmp_path: Path) -> None:
    xml = _xml(_voc_root(tmp_path))
    xml.write_text("<annotation><size>")
    with pytest.raises(DataError, match=re.escape(f"{xml}: malformed XML")):
        parse_annotation(xml)


def test_missing_size_and_bad_number(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no <size>; expected <size> with <width> and <height>"):
        parse_annotation(_xml(_voc_root(tmp_path, size="")))
    with pytest.raises(DataError, match=r"object 0 \(dog\) <xmax> is 'big'; expected a number"):
        parse_annotation(_xml(_voc_root(tmp_path, _obj("dog", ("1", "1", "big", "5")))))


def test_missing_voc_root(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=f"VOC root {tmp_path / 'nope'} does not exist; expected .*Annotations"
    ):
        load_voc(tmp_path / "nope", "trainval")


def test_voc_root_pointing_at_parent(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    with pytest.raises(
        DataError,
        match=re.escape(f"VOC root {tmp_path} has no Annotations folder (did you mean {root}?)"),
    ):
        load_voc(tmp_path, "trainval")


def test_missing_image_set(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    path = root / "ImageSets" / "Main" / "test.txt"
    with pytest.raises(
        DataError, match=re.escape(f"image-set file {path} does not exist; expected")
    ):
        read_image_set(root, "test")


def test_load_voc_reads_split(tmp_path: Path) -> None:
    images = load_voc(_voc_root(tmp_path, _obj("cat")), "trainval")
    assert [im.image_id for im in images] == ["000001"] and images[0].labels.tolist() == [7]


def _class_files(root: Path, lines: str, skip: str = "") -> None:
    for name in ("aeroplane", "cat", "dog"):
        if name != skip:
            (root / "ImageSets" / "Main" / f"{name}_trainval.txt").write_text(lines)


def test_read_class_labels(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    _class_files(root, "000001 -1\n000002  1\n")
    (root / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000002  0\n000001  1\n")
    ids, labels = read_class_labels(root, "trainval", ("aeroplane", "cat", "dog"))
    assert ids == ["000001", "000002"]
    assert labels.dtype == np.int8 and labels.tolist() == [[-1, -1, 1], [1, 1, 0]]


def test_class_file_missing(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    _class_files(root, "000001 1\n", skip="cat")
    path = root / "ImageSets" / "Main" / "cat_trainval.txt"
    with pytest.raises(DataError, match=re.escape(f"image-set file {path} does not exist")):
        read_class_labels(root, "trainval", ("aeroplane", "cat", "dog"))


def test_class_file_with_other_ids(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    _class_files(root, "000001 1\n000009 -1\n")
    with pytest.raises(
        DataError, match=r"trainval.txt lists 2 ids \(1 not in the split, 0 missing, 0 repeated\)"
    ):
        read_class_labels(root, "trainval", ("aeroplane", "cat", "dog"))


def test_class_file_with_bad_label(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    _class_files(root, "000001 2\n")
    with pytest.raises(
        DataError, match=r"aeroplane_trainval.txt: line '000001 2'; expected '<id> <1\|-1\|0>'"
    ):
        read_class_labels(root, "trainval", ("aeroplane", "cat", "dog"))


# ---------------------------------------------------------------- images


def test_load_rgb(tmp_path: Path) -> None:
    image = load_rgb(_jpeg(tmp_path / "a.png"))
    assert (
        image.shape == (6, 8, 3)
        and image.dtype == np.uint8
        and image[0, 0].tolist() == [200, 10, 10]
    )


def test_garbage_jpeg_raises_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(CorruptImageError, match=re.escape(f"cannot decode image {path}: ")):
        load_rgb(path)


def test_truncated_jpeg_raises_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CorruptImageError, match=re.escape(f"cannot decode image {path}")):
        load_rgb(path)


def test_missing_image_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image file .*gone.jpg does not exist") as err:
        load_rgb(tmp_path / "gone.jpg")
    assert not isinstance(err.value, CorruptImageError)


# ---------------------------------------------------------------- ImageNet


def test_scan_imagenet(tmp_path: Path) -> None:
    for name in ("train/n02/b.JPEG", "train/n02/a.jpg", "train/n01/x.PNG", "val/n02/v.jpeg"):
        _jpeg(tmp_path / name)
    (tmp_path / "train/n01/notes.txt").write_text("not an image")
    train, classes = scan_imagenet(tmp_path, "train")
    assert classes == ["n01", "n02"]
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in train] == [
        ("train/n01/x.PNG", 0), ("train/n02/a.jpg", 1), ("train/n02/b.JPEG", 1)
    ]  # fmt: skip
    val, val_classes = scan_imagenet(tmp_path, "val", classes)
    assert val_classes == classes and [c for _, c in val] == [1]


def test_missing_imagenet_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"ImageNet root {tmp_path / 'nope'} does not exist"):
        scan_imagenet(tmp_path / "nope", "train")


def test_imagenet_root_without_train(tmp_path: Path) -> None:
    _jpeg(tmp_path / "n01" / "a.JPEG")  # class folders directly under root
    with pytest.raises(
        DataError,
        match=re.escape(
            f"ImageNet root {tmp_path} has no train folder; expected root/train/<wnid>/*.JPEG"
        ),
    ):
        scan_imagenet(tmp_path, "train")


def test_imagenet_flat_val(tmp_path: Path) -> None:
    _jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(
        DataError,
        match=re.escape(f"{tmp_path / 'val'} has no class folders; expected root/val/<wnid>/"),
    ):
        scan_imagenet(tmp_path, "val", ["n01"])


def test_imagenet_class_without_images(tmp_path: Path) -> None:
    _jpeg(tmp_path / "train" / "n01" / "a.JPEG")
    (tmp_path / "train" / "n02").mkdir()
    with pytest.raises(
        DataError,
        match=re.escape(f"class folder {tmp_path / 'train' / 'n02'} has no .jpeg/.jpg/.png images"),
    ):
        scan_imagenet(tmp_path, "train")


def test_val_wnid_not_in_train(tmp_path: Path) -> None:
    _jpeg(tmp_path / "train" / "n01" / "a.JPEG")
    _jpeg(tmp_path / "val" / "n99" / "a.JPEG")
    _, classes = scan_imagenet(tmp_path, "train")
    with pytest.raises(
        DataError,
        match="class folder\\(s\\) n99 that are not training classes; expected wnids among the 1",
    ):
        scan_imagenet(tmp_path, "val", classes)
