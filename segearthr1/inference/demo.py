"""`segearthr1 demo`: a Gradio web app to try a checkpoint: upload an image, ask, see the mask.

    segearthr1 demo --model_path checkpoints/earthreason [--mask_config mask.yaml] [--host 127.0.0.1] [--port 7860]

Upload a PNG/JPEG/GeoTIFF, type a question, pick the task and the threshold; the page shows the
overlay, the probability map and (reasoning task) the model's answer, and offers the mask PNG and,
for georeferenced inputs, the mask GeoTIFF and GeoJSON for download. The model is loaded once at
start. The app listens on 127.0.0.1 unless --host says otherwise, refuses uploads over
--max_upload_mb, only ever opens files Gradio itself received as uploads (never a path typed into
the page) and reports bad input (unreadable image, empty question) as a message, not a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import cv2
import numpy as np

from ..errors import CheckpointKeyError, CheckpointNotFoundError, DatasetCorruptedError, DependencyNotFoundError
from .geo import write_geojson, write_mask_geotiff
from .predict_cli import add_model_arguments
from .predictor import DEFAULT_MAX_NEW_TOKENS, TASKS, Predictor, check_device, default_task

logger = logging.getLogger(__name__)

UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
USER_ERRORS = (ValueError, FileNotFoundError, DatasetCorruptedError, DependencyNotFoundError)
DEFAULT_MAX_UPLOAD_MB = 50
KEEP_RESULTS = 20  # result folders kept on disk (older ones are deleted)


class DemoError(ValueError):
    """A problem with what the user gave (shown on the page as a message)."""


class DemoApp:
    """The demo's state (one loaded model) and its one action, `run`, independent of the web page."""

    def __init__(self, predictor: Predictor, upload_dir: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 results_dir: str | Path | None = None):
        self.predictor = predictor
        self.upload_dir = Path(upload_dir).resolve()
        self.max_upload_bytes = int(max_upload_mb * 2 ** 20)
        self.results_dir = Path(results_dir or tempfile.mkdtemp(prefix="segearthr1-demo-results-"))
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._views: dict[tuple[str, float], Predictor] = {}

    def _view(self, task: str, threshold: float) -> Predictor:
        """The loaded model with another prompt template / threshold (no reload)."""
        key = (task, float(threshold))
        if key not in self._views:
            base = self.predictor
            self._views[key] = Predictor.from_model(base.model, base.tokenizer, task=task, model_name=base.model_name,
                                                    threshold=threshold, max_query_tokens=base.max_query_tokens)
        return self._views[key]

    def checked_upload(self, path) -> Path:
        """The uploaded file, refusing anything Gradio did not receive as an upload or that is too large."""
        if path is None or (isinstance(path, str) and not path.strip()):
            raise DemoError("no image uploaded; choose a PNG, JPEG or GeoTIFF file first")
        path = Path(getattr(path, "name", path)).resolve()
        if self.upload_dir not in path.parents:
            raise DemoError("only files uploaded through this page can be used")
        if path.suffix.lower() not in UPLOAD_SUFFIXES:
            raise DemoError(f"{path.suffix or 'this file type'} is not supported; upload a PNG, JPEG or GeoTIFF "
                            f"({', '.join(UPLOAD_SUFFIXES)})")
        if not path.is_file():
            raise DemoError("the uploaded file is gone (the server may have restarted); upload it again")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise DemoError(f"the upload is {size / 2 ** 20:.1f} MB, more than this demo's limit of "
                            f"{self.max_upload_bytes / 2 ** 20:.0f} MB; use `segearthr1 predict --tile` for large scenes")
        return path

    def run(self, image_path, question: str, task: str, threshold: float,
            explain: bool = True) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
        """(overlay RGB, probability colour map RGB, answer text, files to download) for one upload."""
        path = self.checked_upload(image_path)
        if task not in TASKS:
            raise DemoError(f"task {task!r} is not one of {list(TASKS)}")
        predictor = self._view(task, float(threshold))
        try:
            pred = predictor.predict(path, question, explain=explain and task == "reasoning",
                                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
        except DatasetCorruptedError as err:
            raise DemoError(f"cannot read the uploaded image: {str(err).replace(str(path), path.name)}") from err
        out = self._new_result_dir()
        stem = Path(path).stem[:40] or "image"
        files = [out / f"{stem}_mask.png"]
        cv2.imwrite(str(files[0]), pred.mask.astype(np.uint8) * 255)
        if pred.geo is not None:
            files.append(write_mask_geotiff(out / f"{stem}_mask.tif", pred.mask, pred.geo))
            files.append(write_geojson(out / f"{stem}_mask.geojson", pred.polygons, pred.geo, {"query": question}))
        answer = pred.answer or ("" if task == "reasoning" else "(the referring task gives no answer text)")
        return pred.overlay(caption=""), probability_map(pred.probability), answer, [str(f) for f in files]

    def _new_result_dir(self) -> Path:
        folders = sorted(self.results_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - KEEP_RESULTS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        out = self.results_dir / uuid.uuid4().hex[:12]
        out.mkdir()
        return out


def probability_map(probability: np.ndarray) -> np.ndarray:
    """[H,W] probabilities -> RGB uint8 (viridis-like OpenCV colour map)."""
    scaled = np.clip(np.nan_to_num(probability) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def build_interface(app: DemoApp, default: str):
    """The Gradio Blocks page around `app.run`."""
    import gradio as gr

    def submit(upload, question, task, threshold):
        try:
            return app.run(upload, question, task, threshold)
        except USER_ERRORS as err:
            raise gr.Error(str(err), print_exception=False) from None

    with gr.Blocks(title="SegEarth-R1 demo") as page:
        gr.Markdown("## SegEarth-R1\nUpload a remote-sensing image (PNG, JPEG or GeoTIFF), ask a question, "
                    "and the model segments the answer.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (PNG, JPEG, GeoTIFF)", file_types=list(UPLOAD_SUFFIXES),
                                 type="filepath", elem_id="upload")
                question = gr.Textbox(label="Question", placeholder="Where could a helicopter land after the flood?",
                                      elem_id="question")
                task = gr.Radio(list(TASKS), value=default, label="Task", elem_id="task")
                threshold = gr.Slider(-5.0, 5.0, value=0.0, step=0.1, label="Logit threshold (0 = probability 0.5)",
                                      elem_id="threshold")
                button = gr.Button("Segment", variant="primary", elem_id="submit")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="numpy", format="png", elem_id="overlay", interactive=False)
                probability = gr.Image(label="Probability", type="numpy", format="png", elem_id="probability",
                                       interactive=False)
                answer = gr.Textbox(label="Answer (reasoning models)", elem_id="answer", interactive=False)
                downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads", interactive=False)
        button.click(submit, [upload, question, task, threshold], [overlay, probability, answer, downloads])
    return page


def build_parser(prog: str = "segearthr1 demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    add_model_arguments(p)
    p.add_argument("--task", choices=TASKS, default=None,
                   help="the task preselected on the page; default: from the checkpoint, else reasoning")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted (MB)")
    return p


def main(argv: list[str] | None = None, prog: str = "segearthr1 demo") -> int:
    from ..runtime import setup_logging

    args = build_parser(prog).parse_args(argv)
    setup_logging()
    try:
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max_upload_mb={args.max_upload_mb} must be > 0")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port} must be between 1 and 65535")
        check_device(args.device)
        task = args.task or default_task(args.model_path)
        predictor = Predictor(args.model_path, mask_config=args.mask_config, device=args.device, dtype=args.dtype,
                              task=task, image_size=args.image_size)
    except USER_ERRORS + (CheckpointNotFoundError, CheckpointKeyError) as err:
        logger.error("%s: %s", type(err).__name__, err)
        return 1
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    upload_dir = Path(tempfile.mkdtemp(prefix="segearthr1-demo-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    app = DemoApp(predictor, upload_dir, args.max_upload_mb)
    page = build_interface(app, task)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the demo listens on %s: anyone who can reach this address can use it", args.host)
    logger.info("demo on http://%s:%d (Ctrl+C to stop)", args.host, args.port)
    import gradio as gr

    local_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                    font_mono=["ui-monospace", "monospace"])  # no web fonts fetched
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, max_file_size=f"{args.max_upload_mb}mb",
        allowed_paths=[str(app.results_dir)], show_error=True, quiet=True, theme=local_fonts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
