"""A compact REFER-style index for RRSIS-D: refs of one split, their images and raw segmentations.

The reference builds the full REFER API and decodes every mask into RAM at start-up at a fixed
800x800. Here only what a split needs is kept (sentences, image file/size, the annotation's raw
polygon/RLE), and masks are decoded on demand with pycocotools at the image's own size.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetCorruptedError, DatasetNotFoundError, DependencyNotFoundError
from .integrity import read_json_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferEntry:
    """One referred object: the ref's ids and its expressions (`raw` text of each sentence)."""

    ref_id: int
    image_id: int
    ann_id: int
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class ImageInfo:
    file_name: str
    height: int
    width: int


def _coco_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError as err:
        raise DependencyNotFoundError(what="RRSIS-D masks are decoded with pycocotools",
                                      hint="`pip install pycocotools`") from err
    return coco_mask


def decode_segmentation(segmentation, height: int, width: int, where: str = "annotation") -> np.ndarray:
    """COCO polygon list / compressed RLE / uncompressed RLE -> HxW uint8 {0,1} (union of parts)."""
    coco_mask = _coco_mask()
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polygons:
            raise DatasetCorruptedError(what="segmentation has no polygon with >= 3 points", where=where,
                                        found=f"{len(segmentation)} part(s)")
        rle = coco_mask.merge(coco_mask.frPyObjects([list(map(float, p)) for p in polygons],
                                                    height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise DatasetCorruptedError(what=f"RLE size {size} differs from the image size in instances.json",
                                        where=where, expected=f"[{height}, {width}]")
        counts = segmentation["counts"]
        rle = coco_mask.frPyObjects(segmentation, height, width) if isinstance(counts, list) else \
            {"size": size, "counts": counts}
    else:
        raise DatasetCorruptedError(what=f"unknown segmentation format {type(segmentation).__name__}", where=where,
                                    expected="a polygon list or an RLE dict with 'size' and 'counts'")
    mask = coco_mask.decode(rle)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return (mask > 0).astype(np.uint8)


def load_refs_pickle(path: Path) -> list:
    try:
        with open(path, "rb") as f:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:  # refs pickled by Python 2 (REFER-era files)
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, IndexError, AttributeError, ImportError) as err:
        raise DatasetCorruptedError(what=f"cannot unpickle the refs file: {err}", where=path) from err
    if not isinstance(refs, list):
        raise DatasetCorruptedError(what="the refs file holds no list", where=path, found=type(refs).__name__,
                                    expected="a list of refs")
    return refs


class ReferIndex:
    """Refs of one split with lazily decoded masks; built from `refs(unc).p` + `instances.json`."""

    def __init__(self, refs: list[ReferEntry], images: dict[int, ImageInfo],
                 segmentations: dict[int, object], available_splits: dict[str, int]):
        self.refs = refs
        self.images = images
        self.segmentations = segmentations
        self.available_splits = available_splits

    @classmethod
    def from_files(cls, refs_path, instances_path, split: str) -> "ReferIndex":
        refs_path, instances_path = Path(refs_path), Path(instances_path)
        for p in (refs_path, instances_path):
            if not p.is_file():
                raise DatasetNotFoundError(what=f"RRSIS-D annotation file {p} does not exist")
        raw_refs = load_refs_pickle(refs_path)

        entries: list[ReferEntry] = []
        split_counts: dict[str, int] = {}
        for i, ref in enumerate(raw_refs):
            try:
                ref_split = str(ref["split"])
                split_counts[ref_split] = split_counts.get(ref_split, 0) + 1
                if ref_split != split:
                    continue
                sentences = tuple(str(s["raw"] if "raw" in s else s["sent"]) for s in ref["sentences"])
                entries.append(ReferEntry(int(ref["ref_id"]), int(ref["image_id"]), int(ref["ann_id"]),
                                          sentences))
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                raise DatasetCorruptedError(
                    what=f"ref #{i} is malformed ({err!r})", where=refs_path,
                    expected="each ref with ref_id, image_id, ann_id, split and sentences with 'raw' text") from err
            if not sentences:
                raise DatasetCorruptedError(what=f"ref_id {entries[-1].ref_id} has no sentences", where=refs_path)

        instances = read_json_file(instances_path, "RRSIS-D instances file")
        try:
            image_list, ann_list = instances["images"], instances["annotations"]
        except (KeyError, TypeError) as err:
            raise DatasetCorruptedError(what=f"cannot read it as COCO instances ({err!r})", where=instances_path,
                                        expected="COCO instances with 'images' and 'annotations'") from err

        wanted_images = {e.image_id for e in entries}
        wanted_anns = {e.ann_id for e in entries}
        images: dict[int, ImageInfo] = {}
        for img in image_list:
            if img.get("id") in wanted_images:
                images[int(img["id"])] = ImageInfo(str(img["file_name"]), int(img["height"]), int(img["width"]))
        segmentations: dict[int, object] = {}
        ann_images: dict[int, int] = {}
        for ann in ann_list:
            if ann.get("id") in wanted_anns:
                segmentations[int(ann["id"])] = ann["segmentation"]
                ann_images[int(ann["id"])] = int(ann["image_id"])
        del instances, image_list, ann_list

        problems = []
        for e in entries:
            if e.image_id not in images:
                problems.append(f"ref_id {e.ref_id}: image_id {e.image_id} not in instances.json images")
            elif e.ann_id not in segmentations:
                problems.append(f"ref_id {e.ref_id}: ann_id {e.ann_id} not in instances.json annotations")
            elif ann_images[e.ann_id] != e.image_id:
                problems.append(f"ref_id {e.ref_id}: ann_id {e.ann_id} belongs to image "
                                f"{ann_images[e.ann_id]}, not to the ref's image_id {e.image_id}")
        if problems:
            raise DatasetCorruptedError(
                what=f"{len(problems)} RRSIS-D ref(s) of split {split!r} do not match {instances_path}",
                found="; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
        logger.info("RRSIS-D index: %d refs in split %r (%d images)", len(entries), split, len(images))
        return cls(entries, images, segmentations, split_counts)

    def __len__(self) -> int:
        return len(self.refs)

    def mask_for(self, ref: ReferEntry) -> np.ndarray:
        """Binary HxW uint8 mask of `ref` at its image's size as recorded in instances.json."""
        info = self.images[ref.image_id]
        return decode_segmentation(self.segmentations[ref.ann_id], info.height, info.width,
                                   f"ref_id {ref.ref_id} (ann_id {ref.ann_id})")
