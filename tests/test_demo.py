"""`segearthr1 demo`: the app's function called directly, and the page driven in headless Chromium."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from model_utils import tiny_model, trained_tokenizer
from segearthr1.inference.demo import DemoApp, DemoError, build_interface, probability_map
from segearthr1.inference.predictor import Predictor
from segearthr1.weights.pretrained import save_pretrained

REPO = Path(__file__).resolve().parents[1]
QUERY = "where is the red triangle"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_model(tiny_model(seed=0).eval(), trained_tokenizer(), task="reasoning", model_name="tiny")


def write_png(path: Path, h: int = 37, w: int = 53) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def test_app_function(tmp_path, predictor):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    app = DemoApp(predictor, uploads, max_upload_mb=0.01, results_dir=tmp_path / "results")
    png = write_png(uploads / "scene.png")
    overlay, prob, answer, files = app.run(str(png), QUERY, "reasoning", 0.0)
    expected = predictor.predict(png, QUERY)
    assert overlay.shape == (37, 53, 3) and prob.shape == (37, 53, 3) and prob.dtype == np.uint8
    assert isinstance(answer, str) and [Path(f).name for f in files] == ["scene_mask.png"]
    np.testing.assert_array_equal(cv2.imread(files[0], cv2.IMREAD_UNCHANGED) > 0, expected.mask)
    # another task and threshold reuse the loaded model
    _, _, answer, files = app.run(str(png), QUERY, "referring", 10.0)
    assert "no answer" in answer and not cv2.imread(files[0], cv2.IMREAD_UNCHANGED).any()
    assert all(view.model is predictor.model for view in app._views.values())

    tif = uploads / "geo.tif"
    with rasterio.open(tif, "w", driver="GTiff", height=20, width=30, count=3, dtype="uint8",
                       crs=CRS.from_epsg(32633), transform=Affine(10, 0, 5e5, 0, -10, 4.6e6)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 256, (3, 20, 30), dtype=np.uint8))
    _, _, _, files = app.run(str(tif), QUERY, "reasoning", 0.0)
    assert [Path(f).suffix for f in files] == [".png", ".tif", ".geojson"]

    broken = uploads / "broken.png"
    broken.write_bytes(b"not an image")
    outside = write_png(tmp_path / "elsewhere.png")
    big = uploads / "big.png"
    big.write_bytes(b"0" * 20000)
    for args, message in (((str(png), "   ", "reasoning", 0.0), "empty"),
                          ((None, QUERY, "reasoning", 0.0), "no image uploaded"),
                          ((str(broken), QUERY, "reasoning", 0.0), "cannot read the uploaded image"),
                          ((str(outside), QUERY, "reasoning", 0.0), "only files uploaded"),
                          ((str(big), QUERY, "reasoning", 0.0), "limit"),
                          ((str(uploads / "notes.txt"), QUERY, "reasoning", 0.0), "not supported")):
        with pytest.raises(ValueError, match=message):
            app.run(*args)
    assert issubclass(DemoError, ValueError)
    np.testing.assert_array_equal(probability_map(np.array([[0.0, 1.0]]))[0, 0] != probability_map(
        np.array([[1.0, 0.0]]))[0, 0], True)
    build_interface(app, "reasoning")  # the page builds without launching


# ------------------------------------------------------------------------------------------------
# end to end, in a real browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"the demo did not answer on {url} within {timeout:.0f} s")


def test_demo_in_headless_chromium(tmp_path, predictor):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver); .ci/run installs them")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install "
                                                                 "selenium, in the `test` extra)")
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = save_pretrained(predictor.model, predictor.tokenizer, tmp_path / "ckpt")
    png = write_png(tmp_path / "scene.png")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "segearthr1.cli", "demo", "--model_path", str(ckpt), "--port",
                             str(port), "--device", "cpu"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, proc)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1600"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        wait = WebDriverWait(driver, 90)

        def until(condition, step: str):
            try:
                return wait.until(condition)
            except TimeoutException:
                body = driver.find_element(By.TAG_NAME, "body").text[-1500:]
                raise AssertionError(f"browser step '{step}' timed out; the page shows:\n{body}") from None

        driver.get(url)
        # an empty upload is reported on the page as a message, not a traceback
        until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#submit")), "page loaded").click()
        until(lambda d: "no image uploaded" in d.find_element(By.TAG_NAME, "body").text, "error message shown")
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text

        until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")),
              "upload field").send_keys(str(png))
        until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload a, #upload .file-name, #upload td")),
              "upload listed")
        until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#question textarea")), "question field").send_keys(QUERY)
        driver.find_element(By.CSS_SELECTOR, "#submit").click()

        def loaded_overlay(d):
            for img in d.find_elements(By.CSS_SELECTOR, "#overlay img"):
                size = d.execute_script("return arguments[0].complete ? [arguments[0].naturalWidth, "
                                        "arguments[0].naturalHeight] : null", img)
                if size and size[0]:
                    return size
            return None

        assert until(loaded_overlay, "overlay shown") == [53, 37]  # the overlay has the upload's size
        links = until(lambda d: d.find_elements(By.CSS_SELECTOR, "#downloads a[href]"), "download offered")
        href = links[0].get_attribute("href")
        assert href.startswith(url) and href.endswith("scene_mask.png")
        with urllib.request.urlopen(href, timeout=30) as response:
            data = np.frombuffer(response.read(), dtype=np.uint8)
        mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask > 0, predictor.predict(png, QUERY).mask)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
