"""Reader for the ImageNet folder layout ``root/{train,val}/<wnid>/*.JPEG``."""

from __future__ import annotations

from pathlib import Path

from cnnft.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})


def _layout(split: str) -> str:
    """The expected layout, for error messages."""
    return f"root/{split}/<wnid>/*.JPEG (e.g. root/train/n01440764/n01440764_10026.JPEG)"


def _class_dirs(split_dir: Path, split: str) -> dict[str, Path]:
    """Non-hidden sub-folders of ``split_dir`` by name; DataError if there are none."""
    dirs = {
        p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")
    }
    if not dirs:
        raise DataError(
            f"ImageNet split folder {split_dir} has no class folders; expected {_layout(split)}"
        )
    return dirs


def _images(class_dir: Path, split: str) -> list[Path]:
    """Sorted image files of one class folder; DataError if there are none."""
    files = sorted(
        p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DataError(
            f"ImageNet class folder {class_dir} has no .jpeg/.jpg/.png images; "
            f"expected {_layout(split)}"
        )
    return files


def scan_imagenet(
    root: str | Path, split: str, classes: list[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """List ``(path, class index)`` samples of ``split``, ordered by class then file name.

    ``classes`` defaults to the sorted wnids of the split; for ``val`` pass the train class list.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} does not exist; expected {_layout(split)}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"ImageNet root {root} has no {split} folder; expected {_layout(split)}")
    dirs = _class_dirs(split_dir, split)
    classes = sorted(dirs) if classes is None else list(classes)
    unknown = sorted(set(dirs) - set(classes))
    if unknown:
        raise DataError(
            f"ImageNet {split} folder {split_dir} has class folder(s) {', '.join(unknown[:5])} "
            "that are not "
            f"training classes; expected wnids among the {len(classes)} classes of root/train"
        )
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples = [
        (p, index[w]) for w in sorted(dirs, key=index.__getitem__) for p in _images(dirs[w], split)
    ]
    return samples, classes
