"""Reader for the PASCAL VOC2007 devkit layout.

``root`` is the ``VOC2007`` folder::

    root/Annotations/<id>.xml
    root/JPEGImages/<id>.jpg
    root/ImageSets/Main/{train,val,trainval,test}.txt      one image id per line
    root/ImageSets/Main/<class>_<split>.txt                lines "<id> <1|-1|0>"

Box convention: boxes are 0-based, half-open pixel coordinates ``[x1, y1, x2, y2)``.
VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)`` maps to ``(xmin - 1, ymin - 1, xmax, ymax)``,
so ``x2 - x1`` is the devkit's inclusive width ``xmax - xmin + 1`` and ``torchvision.ops.box_iou``
on these boxes equals the devkit's IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from cnnft.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = (
    "<root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg and <root>/ImageSets/Main/<split>.txt "
    "(root is the VOC2007 folder)"
)
_REQUIRED_DIRS = ("Annotations", "JPEGImages", "ImageSets/Main")


@dataclass(frozen=True)
class VOCImage:
    """One annotated image; boxes are 0-based half-open ``[x1, y1, x2, y2)`` (module docstring)."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N], index into the class list
    difficult: np.ndarray  # bool [N]
    truncated: np.ndarray  # bool [N]


def _text(node: Element, key: str, xml_path: Path, where: str) -> str:
    """Text of the child ``key`` of ``node``; DataError if it is missing or empty."""
    child = node.find(key)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(
            f"{xml_path}: {where} has no <{key}>; expected a VOC annotation field <{key}>"
        )
    return child.text.strip()


def _number(node: Element, key: str, xml_path: Path, where: str) -> int:
    """Integer value (parsed as float, then rounded) of the child ``key``."""
    text = _text(node, key, xml_path, where)
    try:
        return round(float(text))
    except (ValueError, OverflowError):
        raise DataError(f"{xml_path}: {where} <{key}> is {text!r}; expected a number") from None


def _flag(node: Element, key: str, xml_path: Path, where: str) -> bool:
    """0/1 flag such as ``difficult``; a missing flag means 0."""
    return node.find(key) is not None and _number(node, key, xml_path, where) != 0


def _parse_object(
    node: Element, index: int, width: int, height: int, classes: tuple[str, ...], xml_path: Path
) -> tuple[list[float], int, bool, bool]:
    """(0-based half-open box, class index, difficult, truncated) of one ``<object>``."""
    name = _text(node, "name", xml_path, f"object {index}")
    where = f"object {index} ({name})"
    if name not in classes:
        raise DataError(
            f"{xml_path}: {where} has unknown class {name!r}; expected one of {', '.join(classes)}"
        )
    bndbox = node.find("bndbox")
    if bndbox is None:
        raise DataError(
            f"{xml_path}: {where} has no <bndbox>; expected <bndbox> with xmin, ymin, xmax, ymax"
        )
    xmin, ymin, xmax, ymax = (
        _number(bndbox, k, xml_path, where) for k in ("xmin", "ymin", "xmax", "ymax")
    )
    box = f"{xml_path}: {where} box (xmin={xmin}, ymin={ymin}, xmax={xmax}, ymax={ymax})"
    if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
        raise DataError(
            f"{box} lies outside the {width}x{height} image; "
            f"expected 1 <= xmin, 1 <= ymin, xmax <= {width}, ymax <= {height}"
        )
    if xmin > xmax or ymin > ymax:
        raise DataError(f"{box} is empty; expected xmin <= xmax and ymin <= ymax")
    return (
        [float(xmin - 1), float(ymin - 1), float(xmax), float(ymax)],
        classes.index(name),
        _flag(node, "difficult", xml_path, where),
        _flag(node, "truncated", xml_path, where),
    )


def parse_annotation(xml_path: str | Path, classes: tuple[str, ...] = VOC_CLASSES) -> VOCImage:
    """Parse one VOC annotation file; the image path is ``<root>/JPEGImages/<filename>``."""
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise DataError(f"annotation file {xml_path} does not exist; expected {VOC_LAYOUT}")
    try:
        root = SafeET.parse(xml_path).getroot()
    except (ParseError, defusedxml.DefusedXmlException) as exc:
        raise DataError(
            f"{xml_path}: malformed XML ({exc}); expected a VOC <annotation> document"
        ) from exc
    size = root.find("size")
    if size is None:
        raise DataError(f"{xml_path}: no <size>; expected <size> with <width> and <height>")
    width, height = (_number(size, k, xml_path, "<size>") for k in ("width", "height"))
    if width < 1 or height < 1:
        raise DataError(
            f"{xml_path}: image size {width}x{height}; expected a positive width and height"
        )
    parsed = [
        _parse_object(o, i, width, height, classes, xml_path)
        for i, o in enumerate(root.findall("object"))
    ]
    return VOCImage(
        image_id=xml_path.stem,
        path=xml_path.parent.parent
        / "JPEGImages"
        / _text(root, "filename", xml_path, "<annotation>"),
        width=width,
        height=height,
        boxes=np.array([p[0] for p in parsed], dtype=np.float32).reshape(-1, 4),
        labels=np.array([p[1] for p in parsed], dtype=np.int64),
        difficult=np.array([p[2] for p in parsed], dtype=bool),
        truncated=np.array([p[3] for p in parsed], dtype=bool),
    )


def _check_root(root: Path) -> None:
    """DataError naming the first missing folder of the layout (with a hint if root is a parent)."""
    if not root.is_dir():
        raise DataError(f"VOC root {root} does not exist; expected {VOC_LAYOUT}")
    for sub in _REQUIRED_DIRS:
        if not (root / sub).is_dir():
            hints = [p for p in (root / "VOC2007", root / "VOCdevkit" / "VOC2007") if p.is_dir()]
            hint = f" (did you mean {hints[0]}?)" if hints else ""
            raise DataError(f"VOC root {root} has no {sub} folder{hint}; expected {VOC_LAYOUT}")


def _read_lines(path: Path) -> list[list[str]]:
    """Whitespace-split non-empty lines of an ImageSets file."""
    if not path.is_file():
        raise DataError(f"image-set file {path} does not exist; expected {VOC_LAYOUT}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def read_image_set(root: str | Path, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/<split>.txt``."""
    return [fields[0] for fields in _read_lines(Path(root) / "ImageSets" / "Main" / f"{split}.txt")]


def load_voc(
    root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES
) -> list[VOCImage]:
    """Parse the annotations of every image of ``split``."""
    root = Path(root)
    _check_root(root)
    return [
        parse_annotation(root / "Annotations" / f"{i}.xml", classes)
        for i in read_image_set(root, split)
    ]


def _class_column(path: Path, ids: list[str]) -> np.ndarray:
    """1/-1/0 labels of one ``<class>_<split>.txt`` file, in the order of ``ids``."""
    rows = _read_lines(path)
    bad = [r for r in rows if len(r) != 2 or r[1] not in {"1", "-1", "0"}]
    if bad:
        raise DataError(f"{path}: line {' '.join(bad[0])!r}; expected '<id> <1|-1|0>'")
    labels = {r[0]: int(r[1]) for r in rows}
    if len(labels) != len(rows) or labels.keys() != set(ids):
        raise DataError(
            f"{path} lists {len(rows)} ids ({len(set(labels) - set(ids))} not in the split, "
            f"{len(set(ids) - set(labels))} missing, {len(rows) - len(labels)} repeated); "
            f"expected exactly the {len(ids)} ids of the split file"
        )
    return np.array([labels[i] for i in ids], dtype=np.int8)


def read_class_labels(
    root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES
) -> tuple[list[str], np.ndarray]:
    """Ids of ``split`` and an int8 ``[num_images, num_classes]`` matrix of 1 / -1 / 0.

    As in the devkit, 0 means the image has only difficult objects of that class.
    """
    root = Path(root)
    _check_root(root)
    ids = read_image_set(root, split)
    main = root / "ImageSets" / "Main"
    columns = [_class_column(main / f"{c}_{split}.txt", ids) for c in classes]
    return ids, np.stack(columns, axis=1)
