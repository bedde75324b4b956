"""The look-alike data generator: content rules, layouts, determinism and the CLI."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from segearthr1.data.synthetic import COLORS, SHAPES, generate, make_scene

REPO = Path(__file__).resolve().parents[2]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_scene_rules():
    assert len(COLORS) >= 4 and len(SHAPES) >= 3
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = int(rng.integers(32, 80)), int(rng.integers(32, 80))
        target = (list(COLORS)[i % len(COLORS)], SHAPES[i % len(SHAPES)])
        absent = i % 4 == 0
        scene = make_scene(rng, h, w, None if absent else target, absent=target if absent else None)
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(pairs) >= 3 and len(set(pairs)) == len(pairs)
        assert (target in pairs) != absent
        assert any(c == target[0] and s != target[1] for c, s in pairs)  # same colour, other shape
        assert any(c != target[0] and s == target[1] for c, s in pairs)  # same shape, other colour
        assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
        stacked = np.stack(scene.masks).astype(int)
        assert stacked.sum(axis=(1, 2)).min() > 0 and stacked.sum(axis=0).max() == 1  # visible, no overlap


@pytest.mark.parametrize("prob", [0.0, 0.5])
def test_color_distractor_prob(prob):
    rng = np.random.default_rng(1)
    twins = []
    for i in range(60):
        target = (list(COLORS)[i % len(COLORS)], SHAPES[i % len(SHAPES)])
        absent = i % 5 == 0
        scene = make_scene(rng, 64, 64, None if absent else target, absent=target if absent else None,
                           color_distractor_prob=prob)
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(pairs) >= 3 and len(set(pairs)) == len(pairs) and (target in pairs) != absent
        assert any(c != target[0] and s == target[1] for c, s in pairs)  # the same-shape distractor stays
        twins.append(any(c == target[0] and s != target[1] for c, s in pairs))
    assert sum(twins) == 0 if prob == 0.0 else 15 <= sum(twins) <= 45


def test_generated_layouts_and_content(tmp_path):
    summary = generate(tmp_path, n_train=40, n_val=2, n_test=2, seed=5, min_size=40, max_size=90)
    assert summary["EarthReason"] == {"train": 40, "val": 2, "test": 2}
    er = tmp_path / "rs_reason_seg" / "RSReasonSeg" / "train"
    qas = {p.stem: json.loads(p.read_text()) for p in (er / "QAs").glob("*.json")}
    absent = [s for s, qa in qas.items() if not qa["answer"]]
    assert 2 <= len(absent) <= 12  # ~15% of 40
    assert all(len(qa["questions"]) >= 2 for qa in qas.values())
    shapes_seen, sizes = set(), set()
    for stem, qa in qas.items():
        image_path = next((er / "images").glob(f"{stem}.*"))
        image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        label = cv2.imread(str(er / "labels" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        sizes.add(image.shape[:2])
        color, shape = qa["target"]["color"], qa["target"]["shape"]
        assert all(f"{color} {shape}" in q for q in qa["questions"])
        if qa["answer"]:
            assert set(np.unique(label)) == {0, 255}
            mean = image[label > 0].reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - np.array(COLORS[color])).max() < 45, (stem, color, mean)
            shapes_seen.add(shape)
        else:
            assert label.max() == 0
    assert {p.suffix for p in (er / "images").iterdir()} == {".jpg", ".png"}
    assert any(h != w for h, w in sizes) and len(sizes) > 10
    assert shapes_seen == set(SHAPES)

    rs = tmp_path / "rs_ref_seg" / "RefSegRS"
    for line in (rs / "output_phrase_val.txt").read_text().splitlines():
        sample_id = line.split()[0]
        mask = cv2.imread(str(rs / "masks" / f"{sample_id}.tif"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert (rs / "images" / f"{sample_id}.tif").is_file()

    rd = tmp_path / "rs_ref_seg" / "RRSIS-D"
    with open(rd / "rrsisd" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    assert {r["split"] for r in refs} == {"train", "val", "test"}
    assert all(len(r["sentences"]) >= 2 and "raw" in r["sentences"][0] for r in refs)
    inst = json.loads((rd / "rrsisd" / "instances.json").read_text())
    assert {a["iscrowd"] for a in inst["annotations"]} == {0, 1}
    assert all((rd / "images" / "rrsisd" / "JPEGImages" / im["file_name"]).is_file() for im in inst["images"])


def test_large_images_on_request(tmp_path):
    generate(tmp_path, datasets=("EarthReason",), n_train=1, n_val=0, n_test=0, min_size=1030, max_size=1100)
    image = cv2.imread(str(next((tmp_path / "rs_reason_seg" / "RSReasonSeg" / "train" / "images").iterdir())))
    assert min(image.shape[:2]) > 1024


def test_deterministic_per_seed(tmp_path):
    kw = dict(n_train=3, n_val=1, n_test=1, min_size=32, max_size=48)
    generate(tmp_path / "a", seed=7, **kw)
    generate(tmp_path / "b", seed=7, **kw)
    generate(tmp_path / "c", datasets=("RefSegRS",), seed=7, **kw)
    generate(tmp_path / "d", seed=8, **kw)
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a == b
    c = _tree_digest(tmp_path / "c")
    assert all(a[k] == v for k, v in c.items())  # a dataset does not depend on the others chosen
    assert _tree_digest(tmp_path / "d") != a


def test_parallel_earthreason_writes_the_same_files(tmp_path):
    kw = dict(datasets=("EarthReason",), n_train=7, n_val=3, n_test=0, min_size=32, max_size=48, seed=3)
    generate(tmp_path / "one", workers=1, **kw)
    generate(tmp_path / "two", workers=2, **kw)
    one, two = _tree_digest(tmp_path / "one"), _tree_digest(tmp_path / "two")
    assert one == two and len(one) == 3 * 10


def test_bad_generator_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        generate(tmp_path, datasets=("COCO",))
    with pytest.raises(ValueError, match="min_size"):
        generate(tmp_path, min_size=10, max_size=20)
    with pytest.raises(ValueError, match="absent_fraction"):
        generate(tmp_path, absent_fraction=1.5)


def test_cli(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset",
                                                  REPO / "tools" / "make_synthetic_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's log handlers in place
    rc = cli.main(["--out", str(tmp_path), "--datasets", "EarthReason", "RefSegRS", "--n-train", "2", "--n-val", "1",
                   "--seed", "0", "--min-size", "32", "--max-size", "40"])
    assert rc == 0
    assert len(list((tmp_path / "rs_reason_seg" / "RSReasonSeg" / "test" / "QAs").iterdir())) == 1
    assert (tmp_path / "rs_ref_seg" / "RefSegRS" / "output_phrase_train.txt").is_file()
    assert not (tmp_path / "rs_ref_seg" / "RRSIS-D").exists()


def test_palette_and_object_scale_options(tmp_path):
    from segearthr1.data.synthetic import object_from_dict, shape_mask

    generate(tmp_path / "small", datasets=("EarthReason",), n_train=6, n_val=0, n_test=0, seed=3, num_colors=4,
             min_size=160, max_size=200)
    generate(tmp_path / "big", datasets=("EarthReason",), n_train=6, n_val=0, n_test=0, seed=3, num_colors=4,
             min_size=160, max_size=200, object_scale=1.5)
    radii = {}
    for name in ("small", "big"):
        qa_dir = tmp_path / name / "rs_reason_seg" / "RSReasonSeg" / "train" / "QAs"
        records = [json.loads(p.read_text()) for p in sorted(qa_dir.glob("*.json"))]
        used = {o["color"] for r in records for o in r["objects"]}
        assert used <= set(list(COLORS)[:4])
        radii[name] = np.mean([o["radius"] for r in records for o in r["objects"]])
        for path, record in zip(sorted(qa_dir.glob("*.json")), records):  # `objects` re-render the label
            label = cv2.imread(str(path.parent.parent / "labels" / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
            target = [object_from_dict(o) for o in record["objects"]
                      if (o["color"], o["shape"]) == (record["target"]["color"], record["target"]["shape"])]
            if record["target"]["present"]:
                assert np.array_equal(shape_mask(*label.shape, target[0]) > 0, label > 0)
            else:
                assert not target and label.max() == 0
    assert radii["big"] > 1.2 * radii["small"]
    with pytest.raises(ValueError, match="num_colors"):
        generate(tmp_path / "bad", datasets=("EarthReason",), n_train=1, num_colors=3)
    with pytest.raises(ValueError, match="object_scale"):
        generate(tmp_path / "bad", datasets=("EarthReason",), n_train=1, object_scale=3.0)
