"""Look-alike data in the three real on-disk layouts (DESIGN.md §4), generated from a seed.

Each image shows >= 3 coloured shapes (7 colours x 3 shapes) on a textured, earth-toned background
with roads. The target is named by colour + shape; the scene always holds distractors that share
its colour *or* its shape, and every (colour, shape) pair occurs at most once per image, so the
expression is unambiguous but cannot be solved from colour or shape alone (`color_distractor_prob`
< 1 leaves the same-colour distractor out of some scenes, for an easier task). About
`absent_fraction` of the EarthReason samples ask for a pair that is not in the image (empty answer
list, empty label). Sizes and aspect ratios vary per image between `min_size` and `max_size`.

Used by the tests (tiny images), the quickstart and `tools/make_synthetic_dataset.py`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .spec import SPLITS

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (214, 39, 40), "green": (44, 170, 44), "blue": (31, 90, 225), "yellow": (240, 220, 30),
    "purple": (150, 60, 195), "orange": (255, 130, 14), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
GROUND_TONES = ((128, 116, 92), (96, 118, 82), (140, 132, 114), (104, 104, 98), (150, 128, 100))

# Kept short on purpose: the model mean-pools the question's hidden states, so in long questions the
# colour and shape words are a small share of the description embedding and a tiny model from
# scratch learns the grounding several times slower (measured for the CPU quickstart).
REASONING_QUESTIONS = (
    "Where is the {color} {shape}?",
    "Which {color} {shape} marks a landing spot?",
    "Where could a drone land on the {color} {shape}?",
    "Which area holds the {color} {shape}?",
    "Where should a surveyor mark the {color} {shape}?",
)
REASONING_ANSWERS = (
    "The {color} {shape} at the {position} of the image is the target.",
    "It is the {color} {shape} in the {position}.",
)
REFERRING_SENTENCES = (
    "the {color} {shape} at the {position}",
    "the {color} {shape}",
    "{color} {shape} in the {position} of the image",
)


@dataclass(frozen=True)
class SyntheticOptions:
    """The knobs of `generate` that every dataset writer receives (see `generate`)."""

    min_size: int
    max_size: int
    colors: list[str]
    object_scale: float
    absent_fraction: float
    color_distractor_prob: float
    workers: int = 1


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass
class Scene:
    image: np.ndarray          # HxWx3 uint8 RGB
    objects: list[SceneObject]
    masks: list[np.ndarray]    # per object, HxW uint8 {0,1}

    def describe(self, i: int) -> dict:
        obj = self.objects[i]
        h, w = self.image.shape[:2]
        return {"color": obj.color, "shape": obj.shape, "position": position_words(obj.cx / w, obj.cy / h)}


def position_words(x: float, y: float) -> str:
    """Relative position (0..1) -> 'top left' ... 'bottom right' on a 3x3 grid."""
    row = ("top", "middle", "bottom")[min(int(y * 3), 2)]
    col = ("left", "center", "right")[min(int(x * 3), 2)]
    return f"{row} {col}"


# --- drawing -------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tone = np.array(GROUND_TONES[rng.integers(len(GROUND_TONES))], dtype=np.float32)
    gh, gw = max(2, h // 12), max(2, w // 12)  # low-frequency texture: mostly brightness, a little hue
    coarse = (rng.normal(0.0, 16.0, size=(gh, gw, 1)) + rng.normal(0.0, 5.0, size=(gh, gw, 3))).astype(np.float32)
    img = tone + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0.0, 6.0, size=(h, w, 3)).astype(np.float32)
    thickness = max(1, min(h, w) // 40)
    for _ in range(rng.integers(0, 3)):  # grey roads crossing the scene
        grey = float(rng.integers(70, 110))
        p1 = (int(rng.integers(0, w)), 0) if rng.random() < 0.5 else (0, int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), h - 1) if p1[1] == 0 else (w - 1, int(rng.integers(0, h)))
        cv2.line(img, p1, p2, (grey, grey, grey), thickness)
    return img


def object_from_dict(data: dict) -> SceneObject:
    """Inverse of dataclasses.asdict for the `objects` entries of generated QA files."""
    return SceneObject(**data)


def shape_mask(h: int, w: int, obj: SceneObject) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    if obj.shape == "circle":
        cv2.circle(mask, (int(round(obj.cx)), int(round(obj.cy))), max(1, int(round(obj.radius))), 1, -1)
        return mask
    n = 4 if obj.shape == "square" else 3
    angles = obj.angle + np.arange(n) * (2 * np.pi / n)
    pts = np.stack([obj.cx + obj.radius * np.cos(angles), obj.cy + obj.radius * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _place(rng: np.random.Generator, h: int, w: int, specs: list[tuple[str, str]],
           object_scale: float = 1.0) -> list[SceneObject]:
    """Non-overlapping placement; shrinks all objects and retries when the image is crowded."""
    scale = object_scale
    while True:
        placed: list[SceneObject] = []
        for color, shape in specs:
            for _ in range(200):
                r = max(3.0, float(rng.uniform(0.08, 0.17)) * min(h, w) * scale)
                if 2 * r + 2 > min(h, w):
                    break
                cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
                if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.radius + 2) ** 2 for o in placed):
                    placed.append(SceneObject(color, shape, float(cx), float(cy), r,
                                              float(rng.uniform(0, 2 * np.pi))))
                    break
            else:
                break
        if len(placed) == len(specs):
            return placed
        scale *= 0.8
        if scale < 0.2 * object_scale:
            raise ValueError(f"cannot place {len(specs)} shapes in a {h}x{w} image; use min_size >= 24")


def make_scene(rng: np.random.Generator, h: int, w: int, target: tuple[str, str] | None,
               absent: tuple[str, str] | None = None, colors: list[str] | None = None,
               object_scale: float = 1.0, color_distractor_prob: float = 1.0) -> Scene:
    """Scene with the `target` pair (or without the `absent` pair) plus colour/shape distractors
    drawn from `colors` (default: the whole palette); radii are 8-17% of the short side x object_scale.

    A same-shape distractor is always drawn; a same-colour one with probability `color_distractor_prob`
    (otherwise the scene holds no other object of the target's colour, and an object of another colour
    and shape takes its place). At 1.0 no random number is drawn for it, so scenes stay as before.
    """
    ref_color, ref_shape = target or absent
    colors, shapes = list(colors or COLORS), list(SHAPES)
    specs = [target] if target else []
    color_twin = color_distractor_prob >= 1.0 or bool(rng.random() < color_distractor_prob)
    other_shape = str(rng.choice([s for s in shapes if s != ref_shape]))
    if color_twin:
        specs.append((ref_color, other_shape))
    specs.append((str(rng.choice([c for c in colors if c != ref_color])), ref_shape))
    if not color_twin:
        specs.append((str(rng.choice([c for c in colors if c != ref_color])), other_shape))
    pool = [(c, s) for c in colors for s in shapes if (c, s) != (ref_color, ref_shape) and (c, s) not in specs
            and (color_twin or c != ref_color)]
    n_extra = int(rng.integers(0 if target else 1, 3))
    for k in rng.choice(len(pool), size=n_extra, replace=False):
        specs.append(pool[int(k)])
    specs = [specs[i] for i in rng.permutation(len(specs))]

    objects = _place(rng, h, w, specs, object_scale)
    image = _background(rng, h, w)
    masks = []
    for obj in objects:
        m = shape_mask(h, w, obj)
        color = np.array(COLORS[obj.color], dtype=np.float32) + rng.normal(0.0, 8.0, size=3)
        image[m > 0] = color
        masks.append(m)
    image = np.clip(image + rng.normal(0.0, 3.0, size=image.shape), 0, 255).astype(np.uint8)
    return Scene(image, objects, masks)


def _random_pair(rng: np.random.Generator, colors: list[str]) -> tuple[str, str]:
    return str(rng.choice(colors)), str(rng.choice(SHAPES))


def _size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    return int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))


def _referring_scene(rng: np.random.Generator, opts: SyntheticOptions) -> tuple[Scene, tuple[str, str]]:
    """A scene of random size holding a random (colour, shape) target, and that target."""
    h, w = _size(rng, opts.min_size, opts.max_size)
    pair = _random_pair(rng, opts.colors)
    return make_scene(rng, h, w, pair, colors=opts.colors, object_scale=opts.object_scale,
                      color_distractor_prob=opts.color_distractor_prob), pair


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"cannot write {path}")


def _write_gray(path: Path, mask: np.ndarray) -> None:
    if not cv2.imwrite(str(path), mask):
        raise OSError(f"cannot write {path}")


# --- RLE / polygons for RRSIS-D -----------------------------------------------------------------------------------
def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def polygons_of(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1, 2).astype(float).ravel().tolist() for c in contours if len(c) >= 3]
    return polys or [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]]


def _segmentation(mask: np.ndarray, kind: int):
    from pycocotools import mask as coco_mask

    if kind == 0:
        return polygons_of(mask), 0
    if kind == 1:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}, 0
    return uncompressed_rle(mask), 1


# --- dataset writers ------------------------------------------------------------------------------------------------
def _earthreason_sample(base: Path, split: str, i: int, seed: int, stream: int, opts: SyntheticOptions) -> None:
    """Write sample i of `split`. Its random stream depends only on (seed, stream, split, i), so samples
    can be written in any order and by several processes and the files are the same."""
    rng = np.random.default_rng([seed, stream, SPLITS.index(split), i])
    h, w = _size(rng, opts.min_size, opts.max_size)
    pair = _random_pair(rng, opts.colors)
    is_absent = bool(rng.random() < opts.absent_fraction)
    scene = make_scene(rng, h, w, None if is_absent else pair, absent=pair if is_absent else None,
                       colors=opts.colors, object_scale=opts.object_scale,
                       color_distractor_prob=opts.color_distractor_prob)
    stem = f"{split}_{i:05d}"
    _write_rgb(base / "images" / f"{stem}{'.png' if i % 4 == 3 else '.jpg'}", scene.image)
    label = np.zeros((h, w), np.uint8)
    words = {"color": pair[0], "shape": pair[1]}
    if not is_absent:
        k = next(j for j, o in enumerate(scene.objects) if (o.color, o.shape) == pair)
        label = scene.masks[k] * 255
        words = scene.describe(k)
    templates = rng.choice(len(REASONING_QUESTIONS), size=3, replace=False)
    qa = {
        "questions": [REASONING_QUESTIONS[t].format(**words) for t in templates],
        "answer": [] if is_absent else [a.format(**words) for a in REASONING_ANSWERS],
        "target": {"color": pair[0], "shape": pair[1], "present": not is_absent},
        # every drawn object (re-render with shape_mask), e.g. for the quickstart's baselines
        "objects": [dataclasses.asdict(o) for o in scene.objects],
    }
    _write_gray(base / "labels" / f"{stem}.png", label.astype(np.uint8))
    (base / "QAs" / f"{stem}.json").write_text(json.dumps(qa, indent=1), encoding="utf-8")


def _earthreason_chunk(args: tuple) -> int:
    base, split, indices, rest = args
    for i in indices:
        _earthreason_sample(Path(base), split, i, *rest)
    return len(indices)


def write_earthreason(root: Path, seed: int, stream: int, counts: dict, opts: SyntheticOptions) -> dict:
    """EarthReason's tree under `root`; written by `opts.workers` processes (same files for any number)."""
    out = {}
    rest, workers = (seed, stream, opts), opts.workers
    for split, n in counts.items():
        base = root / "rs_reason_seg" / "RSReasonSeg" / split
        for sub in ("images", "labels", "QAs"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if workers > 1 and n > 1:
            import multiprocessing as mp

            # interleaved chunks: image sizes are random, so contiguous ranges would balance worse
            chunks = [(str(base), split, list(range(k, n, workers)), rest) for k in range(min(workers, n))]
            # fork where available: spawned workers would re-import torch (seconds each); the workers
            # only run numpy/OpenCV code
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(len(chunks)) as pool:
                pool.map(_earthreason_chunk, chunks)
        else:
            _earthreason_chunk((str(base), split, list(range(n)), rest))
        out[split] = n
    return out


def write_rrsisd(root: Path, seed: int, stream: int, counts: dict, opts: SyntheticOptions) -> dict:
    """RRSIS-D's tree under `root` (refs pickle + COCO instances with polygon and RLE masks)."""
    rng = np.random.default_rng([seed, stream])
    base = root / "rs_ref_seg" / "RRSIS-D"
    img_dir = base / "images" / "rrsisd" / "JPEGImages"
    img_dir.mkdir(parents=True, exist_ok=True)
    (base / "rrsisd").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    out = {}
    for split, n in counts.items():
        out[split] = 0
        for _ in range(n):
            scene, _ = _referring_scene(rng, opts)
            h, w = scene.image.shape[:2]
            image_id = len(images) + 1
            file_name = f"{image_id:05d}.jpg"
            _write_rgb(img_dir / file_name, scene.image)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            n_refs = 2 if rng.random() < 0.3 else 1
            for k in rng.choice(len(scene.objects), size=n_refs, replace=False):
                k = int(k)
                ann_id = len(annotations) + 1
                seg, iscrowd = _segmentation(scene.masks[k], ann_id % 3)
                ys, xs = np.nonzero(scene.masks[k])
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(scene.objects[k].shape) + 1,
                    "segmentation": seg, "iscrowd": iscrowd, "area": float(scene.masks[k].sum()),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                })
                words = scene.describe(k)
                n_sent = int(rng.integers(2, len(REFERRING_SENTENCES) + 1))
                order = rng.permutation(len(REFERRING_SENTENCES))[:n_sent]
                sentences = []
                for t in order:
                    raw = REFERRING_SENTENCES[int(t)].format(**words)
                    sentences.append({"raw": raw, "sent": raw, "tokens": raw.split(),
                                      "sent_id": len(refs) * 10 + len(sentences)})
                refs.append({"ref_id": len(refs) + 1, "image_id": image_id, "ann_id": ann_id, "split": split,
                             "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                             "file_name": file_name, "category_id": SHAPES.index(scene.objects[k].shape) + 1})
                out[split] += 1
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    (base / "rrsisd" / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    with open(base / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return out


def write_refsegrs(root: Path, seed: int, stream: int, counts: dict, opts: SyntheticOptions) -> dict:
    """RefSegRS's tree under `root` (TIFF tiles, 0/255 masks, one phrase file per split)."""
    rng = np.random.default_rng([seed, stream])
    base = root / "rs_ref_seg" / "RefSegRS"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "masks").mkdir(parents=True, exist_ok=True)
    next_id = 10000
    out = {}
    for split, n in counts.items():
        lines = []
        for _ in range(n):
            scene, pair = _referring_scene(rng, opts)
            k = next(j for j, o in enumerate(scene.objects) if (o.color, o.shape) == pair)
            _write_rgb(base / "images" / f"{next_id}.tif", scene.image)
            _write_gray(base / "masks" / f"{next_id}.tif", (scene.masks[k] * 255).astype(np.uint8))
            words = scene.describe(k)
            n_lines = 2 if rng.random() < 0.3 else 1
            for t in rng.permutation([0, 2])[:n_lines]:
                lines.append(f"{next_id} {REFERRING_SENTENCES[int(t)].format(**words)}")
            next_id += 1
        (base / f"output_phrase_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[split] = len(lines)
    return out


def generate(root, datasets=None, n_train: int = 8, n_val: int = 4, n_test: int = 4,
             seed: int = 0, min_size: int = 64, max_size: int = 128, absent_fraction: float = 0.15,
             num_colors: int = len(COLORS), object_scale: float = 1.0, color_distractor_prob: float = 1.0,
             workers: int = 1) -> dict:
    """Write the chosen datasets (default: every registered one with a generator) under `root`
    (= DATA_ROOT); returns {dataset: {split: samples}}.

    n_* are images per split (RRSIS-D may add a second ref per image; RefSegRS a second phrase line).
    `num_colors` (4..7) restricts the palette to its first N colours and `object_scale` (0.5..2)
    scales the shapes' radii and `color_distractor_prob` (0..1) is the share of scenes with a second object
    of the target's colour (easier tasks, e.g. for the CPU quickstart; see `make_scene`).
    Each dataset draws from its own seeded stream (its position in the registry), so its files do not
    depend on the others chosen. EarthReason seeds every sample from (seed, split, index) and is
    written by `workers` processes (the files do not depend on `workers`).
    """
    # the registry's dataset files name this module's writers, so it is imported here, not at the top
    from .registry import DATASETS, synthetic_names

    names = synthetic_names() if datasets is None else list(datasets)
    unknown = [d for d in names if d not in synthetic_names()]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; expected a subset of {synthetic_names()}")
    if not 24 <= min_size <= max_size:
        raise ValueError(f"need 24 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if min(n_train, n_val, n_test) < 0:
        raise ValueError(f"split sizes must be >= 0, got {n_train}, {n_val}, {n_test}")
    if not 4 <= num_colors <= len(COLORS):
        raise ValueError(f"num_colors={num_colors} must be between 4 and {len(COLORS)} (the first N of {list(COLORS)})")
    if not 0.5 <= object_scale <= 2.0:
        raise ValueError(f"object_scale={object_scale} must be in [0.5, 2.0]")
    if not 0.0 <= color_distractor_prob <= 1.0:
        raise ValueError(f"color_distractor_prob={color_distractor_prob} must be in [0, 1]")
    if not 0.0 <= absent_fraction < 1.0:
        raise ValueError(f"absent_fraction={absent_fraction} must be in [0, 1)")
    root = Path(root)
    opts = SyntheticOptions(min_size, max_size, list(COLORS)[:num_colors], object_scale, absent_fraction,
                            color_distractor_prob, workers)
    summary = {}
    for name in names:
        spec = DATASETS[name].spec
        counts = {split: n for split, n in zip(SPLITS, (n_train, n_val, n_test)) if split in spec.splits}
        summary[name] = spec.write_synthetic(root, seed, list(DATASETS).index(name), counts, opts)
        logger.info("wrote synthetic %s under %s: %s", name, root, summary[name])
    return summary
