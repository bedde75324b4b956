"""report.html: one self-contained page per evaluation run that people actually look at.

Why: a metrics.json says *how much*, not *what*: the page shows the metrics table (reference protocol
and the extended blocks with their intervals), the IoU histogram, the precision-at-threshold curve,
the empty-target confusion and galleries of the best, median and worst samples (overlays with the
question and, for reasoning data, the dataset's answer). Every image is inlined as a data URI, so
the file can be mailed or attached to a paper review as is. Plots are drawn with matplotlib (Agg).
"""
from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ..data.collate import DataCollator, batch_to_device
from ..data.transforms import crop_letterbox, denormalize_images
from ..visualization import draw_overlay
from .files import read_mask_png
from .samples import IndexedSubset

logger = logging.getLogger(__name__)

GALLERY_WIDTH = 320  # px of each gallery overlay (keeps the page small)
METRIC_ROWS = ("giou", "ciou", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8", "precision@0.9",
               "num_samples")

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.plots img{max-width:48%;margin-right:1%}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:320px}
figure img{width:320px;border:1px solid #ccc}figcaption{font-size:13px}.muted{color:#666}
"""


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_data_uri(buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def iou_histogram(rows: Sequence[dict]) -> str:
    """Histogram of per-sample IoU (letterboxed; original resolution too when present) as a data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 21)
    ax.hist([r["iou"] for r in rows], bins=bins, alpha=0.7, label="letterboxed")
    if rows and all(r.get("orig_iou") is not None for r in rows):
        ax.hist([r["orig_iou"] for r in rows], bins=bins, alpha=0.5, label="original resolution")
    ax.set_xlabel("per-sample IoU")
    ax.set_ylabel("samples")
    ax.set_title("IoU histogram")
    ax.legend()
    return _figure_uri(fig)


def precision_curve(rows: Sequence[dict]) -> str:
    """P@t (fraction of samples with IoU > t) for t in [0, 1] as a data URI."""
    plt = _pyplot()
    t = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    iou = np.array([r["iou"] for r in rows], dtype=np.float64)
    ax.plot(t, [(iou > x).mean() for x in t], label="letterboxed")
    if rows and all(r.get("orig_iou") is not None for r in rows):
        orig = np.array([r["orig_iou"] for r in rows], dtype=np.float64)
        ax.plot(t, [(orig > x).mean() for x in t], label="original resolution")
    ax.set_xlabel("IoU threshold t")
    ax.set_ylabel("P@t")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("precision at IoU threshold")
    ax.legend()
    return _figure_uri(fig)


def confusion_plot(confusion: dict) -> str:
    """2x2 empty-target confusion (target present/empty x prediction non-empty/empty) as a data URI."""
    plt = _pyplot()
    table = np.array([[confusion["target_predicted"], confusion["target_missed"]],
                      [confusion["empty_false_alarm"], confusion["empty_correct"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(table, cmap="Blues")
    for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > table.max() / 2 else "black")
    ax.set_xticks([0, 1], ["prediction\nnon-empty", "prediction\nempty"])
    ax.set_yticks([0, 1], ["target\npresent", "target\nempty"])
    ax.set_title("empty-target confusion")
    return _figure_uri(fig)


def gallery_rows(rows: Sequence[dict], k: int) -> dict[str, list[dict]]:
    """{"best", "median", "worst"}: k rows each by letterboxed IoU (ties broken by sample index)."""
    order = sorted(rows, key=lambda r: (r["iou"], r["index"]))
    if k <= 0 or not order:
        return {"best": [], "median": [], "worst": []}
    mid = max(0, len(order) // 2 - k // 2)
    return {"best": order[::-1][:k], "median": order[mid:mid + k], "worst": order[:k]}


def _sample_overlay(dataset, row: dict, seed: int, model, pad_token_id, device, prediction_dir) -> str:
    """Overlay of one sample (prediction red, ground truth green) on its image band, as a data URI."""
    sample = IndexedSubset(dataset, [row["index"]], seed=seed)[0]
    saved = Path(prediction_dir) / f"{row['name']}.png" if prediction_dir is not None else None
    if saved is not None and saved.is_file():
        pred = torch.from_numpy(read_mask_png(saved))
    else:  # predictions were not saved: run the model on this one sample again
        batch = DataCollator(pad_token_id)([sample])
        batch.pop("sample_index", None)
        with torch.no_grad():
            pred = model.predict(**batch_to_device(batch, device)).masks[0].detach().to("cpu", torch.bool)
    image = torch.from_numpy(denormalize_images(sample["images"][None])[0]).permute(2, 0, 1)
    gt = sample["masks"][0] == 1
    geometry = sample.get("letterbox")
    if geometry is not None:  # show the image band only, not the padding
        image, pred, gt = crop_letterbox(image, geometry), crop_letterbox(pred, geometry), crop_letterbox(gt, geometry)
    overlay = draw_overlay(image.permute(1, 2, 0).contiguous().numpy(), pred.numpy(), gt.numpy())
    h, w = overlay.shape[:2]
    scale = GALLERY_WIDTH / w
    overlay = cv2.resize(overlay, (GALLERY_WIDTH, max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode the overlay of {row['name']}")
    return _png_data_uri(png.tobytes())


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _ci(block: dict, key: str) -> str:
    ci = block.get("ci95", {}).get(key)
    return f" <span class='muted'>[{ci[0]:.4f}, {ci[1]:.4f}]</span>" if ci else ""


def metrics_table(metrics: dict) -> str:
    """Reference-protocol column plus one column per extended block, 95 % intervals in brackets."""
    blocks = [(name, metrics[name]) for name in ("letterboxed", "original_resolution") if name in metrics]
    head = "".join(f"<th>{html.escape(name.replace('_', ' '))}</th>" for name, _ in blocks)
    body = []
    for key in METRIC_ROWS:
        cells = "".join(f"<td>{_fmt(b.get(key))}{_ci(b, key)}</td>" for _, b in blocks)
        body.append(f"<tr><td class='l'>{key}</td><td>{_fmt(metrics.get(key))}</td>{cells}</tr>")
    extra = [("gIoU on targets", lambda b: b["empty_target"]["target"]["giou"]),
             ("cIoU on targets", lambda b: b["empty_target"]["target"]["ciou"]),
             ("gIoU on empty targets", lambda b: b["empty_target"]["empty"]["giou"]),
             ("false-alarm rate", lambda b: b["empty_target"]["false_alarm_rate"]),
             ("miss rate", lambda b: b["empty_target"]["miss_rate"]),
             ("gIoU per image", lambda b: b["per_image"]["giou"]),
             ("cIoU per image", lambda b: b["per_image"]["ciou"])]
    for label, get in extra:
        cells = "".join(f"<td>{_fmt(get(b))}</td>" for _, b in blocks)
        body.append(f"<tr><td class='l'>{label}</td><td>—</td>{cells}</tr>")
    return (f"<table><tr><th class='l'>metric</th><th>reference protocol</th>{head}</tr>"
            + "".join(body) + "</table>")


def render_html(metrics: dict, rows: Sequence[dict], galleries: dict[str, list[tuple[dict, str]]]) -> str:
    """The whole page; `galleries` maps a title to (row, overlay data URI) pairs."""
    title = f"SegEarth-R1 evaluation: {metrics.get('dataset', '')} / {metrics.get('data_split', '')}"
    block = metrics.get("letterboxed")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='muted'>checkpoint: " + _fmt(metrics.get("checkpoint")) + " · question sampling: "
             + _fmt(metrics.get("question_sampling")) + " · samples: " + _fmt(metrics.get("num_samples"))
             + " · fast decode: " + _fmt(metrics.get("fast_decode")) + " · " + _fmt(metrics.get("timestamp")) + "</p>",
             "<h2>Metrics</h2>", metrics_table(metrics),
             "<p class='muted'>Reference protocol: letterboxed masks incl. padding (the published numbers). "
             "Brackets: 95 % percentile-bootstrap intervals "
             f"({_fmt(metrics.get('bootstrap', {}).get('resamples'))} resamples).</p>",
             "<h2>Distributions</h2><div class='plots'>",
             f"<img alt='IoU histogram' src='{iou_histogram(rows)}'>",
             f"<img alt='P@t curve' src='{precision_curve(rows)}'></div>"]
    if block is not None:
        confusion = block["empty_target"]["confusion"]
        parts.append("<h2>Empty targets (letterboxed)</h2><div class='plots'>"
                     f"<img alt='empty-target confusion' src='{confusion_plot(confusion)}'></div>")
    for name, items in galleries.items():
        parts.append(f"<h2>{html.escape(name)} samples</h2><div class='gallery'>")
        for row, uri in items:
            answer = f"<br><i>answer:</i> {html.escape(row['answer'])}" if row.get("answer") else ""
            orig = f" · IoU (original) {row['orig_iou']:.3f}" if row.get("orig_iou") is not None else ""
            parts.append(f"<figure><img alt='{html.escape(row['name'])}' src='{uri}'><figcaption>"
                         f"<b>{html.escape(row['name'])}</b> · IoU {row['iou']:.3f}{orig}<br>"
                         f"<i>question:</i> {html.escape(row.get('question', ''))}{answer}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<p class='muted'>Overlays: prediction tinted and outlined red, ground truth outlined green.</p>"
                 "</body></html>")
    return "\n".join(parts)


def write_report(out_dir, metrics: dict, rows: Sequence[dict], dataset, *, model=None, pad_token_id=None,
                 seed: int = 0, device=None, prediction_dir=None, num_gallery: int = 4) -> Path:
    """Write out_dir/report.html; gallery masks come from `prediction_dir` or, if absent, the model."""
    galleries: dict[str, list[tuple[dict, str]]] = {}
    for name, picked in gallery_rows(rows, num_gallery).items():
        galleries[name] = [(r, _sample_overlay(dataset, r, seed, model, pad_token_id, device, prediction_dir))
                           for r in picked]
    path = Path(out_dir) / "report.html"
    path.write_text(render_html(metrics, rows, galleries), encoding="utf-8")
    return path
