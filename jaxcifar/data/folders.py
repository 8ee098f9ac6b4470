"""Local copies of CIFAR in the ImageFolder layout: ``<root>/{train,test}/<class>/*.{png,jpg,jpeg}``, where
``<root>`` is the given path or one folder inside it (e.g. ``cifar10/`` inside ``cifar10_jpeg.zip``), as a
directory or a zip. Images are decoded with PIL (accurate JPEG IDCT) and never extracted to disk."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from jaxcifar.errors import DataError, first_line

IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")



class _Files:
    """Uniform read access to a directory tree or a zip archive (members are read, never extracted)."""

    def __init__(self, source: Path):
        self.source = source
        self.zip: zipfile.ZipFile | None = None
        if source.is_file():
            try:
                self.zip = zipfile.ZipFile(source)
            except zipfile.BadZipFile as e:
                raise DataError(f"{source} is not a readable zip ({e}): pass an ImageFolder directory or zip") from e
            names = [i.filename for i in self.zip.infolist()]  # folders end with "/"
        else:
            names = []
            for root, dirs, files in os.walk(source):
                rel = os.path.relpath(root, source).replace(os.sep, "/")
                rel = "" if rel == "." else rel + "/"
                names += [f"{rel}{d}/" for d in dirs] + [f"{rel}{f}" for f in files]
        for n in names:
            p = PurePosixPath(n)
            if p.is_absolute() or ".." in p.parts:
                raise DataError(f"{source} contains the unsafe member name {n!r}: refusing to read it")
        self.names = sorted(names)

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``; a damaged archive (bad CRC, truncated) or unreadable file is a
        ``DataError``."""
        try:
            if self.zip is not None:
                return self.zip.read(name)
            return (self.source / name).read_bytes()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read {name} from {self.source} ({first_line(e)}): the copy is damaged; "
                            "copy or download it again") from e


def _find_root(names: list[str], source: Path) -> str:
    """The prefix (``''`` or ``'dir/'``) under which both ``train/`` and ``test/`` live."""
    candidates = {""} | {n.split("/", 1)[0] + "/" for n in names if "/" in n}
    for prefix in sorted(candidates, key=len):
        if all(any(n.startswith(f"{prefix}{s}/") for n in names) for s in SPLITS):
            return prefix
    raise DataError(
        f"{source} has no train/ and test/ folders: expected <root>/{{train,test}}/<class>/*.png|jpg"
    )


def read_image_folder(source: Path, name: str, progress: bool) -> dict[str, np.ndarray]:
    files = _Files(source)
    root = _find_root(files.names, source)
    per_split: dict[str, dict[str, list[str]]] = {}
    for s in SPLITS:
        classes: dict[str, list[str]] = {}
        prefix = f"{root}{s}/"
        for n in files.names:
            if not n.startswith(prefix):
                continue
            parts = n[len(prefix):].split("/")
            if len(parts) == 2 and parts[0]:  # "<class>/<file>" or the folder "<class>/" itself
                images = classes.setdefault(parts[0], [])
                if parts[1].lower().endswith(IMAGE_SUFFIXES):
                    images.append(n)
        per_split[s] = classes
        empty = sorted(c for c, images in classes.items() if not images)
        if empty and len(empty) < len(classes):  # all empty: "split is empty" below says it better
            raise DataError(f"class folder(s) {empty} under {root}{s}/ in {source} hold no images: add their "
                            f"images, or remove the folders from both splits")
    train_classes, test_classes = set(per_split["train"]), set(per_split["test"])
    if not train_classes and not test_classes:
        raise DataError(f"{source}: no images under {root}train/<class>/ or {root}test/<class>/")
    if train_classes != test_classes:
        only_train = sorted(train_classes - test_classes)
        only_test = sorted(test_classes - train_classes)
        raise DataError(
            f"class folders differ between splits in {source}: only in train {only_train}, "
            f"only in test {only_test}; make both splits hold the same class folders"
        )
    class_names = tuple(sorted(train_classes))
    if name == "cifar10" and set(class_names) == set(CIFAR10_CLASSES):
        class_names = CIFAR10_CLASSES
    total = sum(len(v) for d in per_split.values() for v in d.values())
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    with tqdm(total=total, desc=f"decoding {source.name}", unit="img", disable=not progress) as bar:
        for s in SPLITS:
            images, labels = [], []
            for label, cls in enumerate(class_names):
                for n in per_split[s][cls]:
                    images.append(_decode(files.read(n), n, source))
                    labels.append(label)
                    bar.update()
            if not images:
                raise DataError(f"split {s!r} of {source} is empty: add images under {s}/<class>/")
            arrays[f"{s}_images"] = np.stack(images)
            arrays[f"{s}_labels"] = np.asarray(labels, np.int32)
    return arrays


def _decode(data: bytes, member: str, source: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises several types for damaged files
        raise DataError(f"cannot decode image {member} in {source} ({e}): replace or delete that file") from e
    if img.shape != IMAGE_SHAPE:
        raise DataError(f"image {member} in {source} is {img.shape[0]}x{img.shape[1]} (height x width), CIFAR "
                        f"images are 32x32: resize it or remove it")
    return img
