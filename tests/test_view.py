"""`mskjax.view`: the interactive viewer's server through its JSON API (urllib), and end to end in
headless Chromium (selenium + Debian's chromium and chromedriver; skipped when they are missing):
open a radiograph, drag a box on the canvas, a mask comes back."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mskjax.pipeline import Pipeline, PipelineConfig
from mskjax.view import PAGE, Viewer, make_app

ROOT = Path(__file__).resolve().parents[1]
FRACATLAS = ROOT.parent / "shared" / "data" / "fracatlas" / "images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def _pipeline_helpers():
    """test_pipeline.py's checkpoint builders (tests/ is not a package: load by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline", Path(__file__).with_name("test_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    """A real radiograph when the shared data is here, else a small synthetic PNG."""
    files = sorted(FRACATLAS.glob("*.jpg")) if FRACATLAS.is_dir() else []
    if files:
        return str(files[0])
    path = tmp_path_factory.mktemp("img") / "radiograph.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 120), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    cls_dir, sam_dir = _pipeline_helpers().make_checkpoints(root, "letterbox", seed=3)
    pipe = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.0))  # every image gets a mask
    srv = make_app(Viewer(pipe), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_page_is_self_contained():
    assert "<canvas" in PAGE and "http://" not in PAGE and "https://" not in PAGE and "<script src" not in PAGE


def test_api_open_prompt_and_errors(server, image_path):
    status, data = _post(server + "/api/open", {"path": image_path})
    assert status == 200, data
    w, h = Image.open(image_path).size
    assert (data["width"], data["height"]) == (w, h)
    assert 0.0 <= data["probability"] <= 1.0 and data["predicted"]
    assert len(data["boxes"]) == 1
    assert _png(data["mask"]).shape == (h, w) and _png(data["overlay"]).shape[:2] == (h, w)

    box = [w * 0.2, h * 0.3, w * 0.6, h * 0.7]
    status, m = _post(server + "/api/box", {"id": data["id"], "box": box})
    assert status == 200, m
    mask = _png(m["mask"])
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255} and m["mask_area"] == int((mask > 0).sum())
    with urllib.request.urlopen(server + m["mask_url"], timeout=30) as r:  # the download
        assert r.headers["Content-Type"] == "image/png" and "attachment" in r.headers["Content-Disposition"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.read()))), mask)

    # Bad inputs: a clear JSON error, never a traceback.
    missing = str(Path(image_path).with_name("no_such_image.png"))
    status, err = _post(server + "/api/open", {"path": missing})
    assert status == 404 and "no such file" in err["error"] and missing in err["error"]
    status, err = _post(server + "/api/open", {"path": __file__})  # a file that is not an image
    assert status == 400 and "cannot read" in err["error"] and "Traceback" not in err["error"]
    status, err = _post(server + "/api/open", {"path": str(Path(image_path).parent)})  # a folder
    assert status == 400 and "cannot read" in err["error"]
    status, err = _post(server + "/api/box", {"id": data["id"], "box": [w + 10, h + 10, w + 50, h + 50]})
    assert status == 400 and "outside the image" in err["error"]
    status, err = _post(server + "/api/box", {"id": data["id"], "box": [10, 10, 10, 40]})
    assert status == 400 and "zero area" in err["error"]
    status, err = _post(server + "/api/box", {"id": data["id"], "box": [1, 2]})
    assert status == 400 and "four numbers" in err["error"]
    status, err = _post(server + "/api/box", {"id": "ffff", "box": box})
    assert status == 404 and "unknown image id" in err["error"]


def test_api_cam_method_and_layer(server, image_path):
    """The map again for the open image with another method and layer; unknown ones: a JSON error."""
    with urllib.request.urlopen(server + "/api/config", timeout=30) as r:
        cfg = json.loads(r.read())
    assert "eigen_cam" in cfg["methods"] and cfg["layers"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert (cfg["cam"], cfg["cam_layer"]) == ("grad_cam", None)
    status, data = _post(server + "/api/open", {"path": image_path})
    assert status == 200, data
    assert (data["cam"], data["cam_layer"]) == ("grad_cam", None)

    status, new = _post(server + "/api/cam", {"id": data["id"], "cam": "eigen_cam", "cam_layer": "layer2"})
    assert status == 200, new
    assert (new["cam"], new["cam_layer"], new["id"]) == ("eigen_cam", "layer2", data["id"])
    assert len(new["cam_peak"]) == 2 and len(new["boxes"]) == 1
    over_old, over_new = _png(data["overlay"]), _png(new["overlay"])
    assert over_new.shape == over_old.shape
    assert not np.array_equal(over_old, over_new) or new["cam_peak"] != data["cam_peak"]
    with urllib.request.urlopen(server + new["mask_url"], timeout=30) as r:  # the latest mask is this map's
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.read()))), _png(new["mask"]))
    status, back = _post(server + "/api/cam", {"id": data["id"], "cam": "grad_cam", "cam_layer": "last"})
    assert status == 200 and (back["cam"], back["cam_layer"]) == ("grad_cam", None)
    assert np.array_equal(_png(back["overlay"]), over_old)  # the default map again, from the kept pipeline

    status, err = _post(server + "/api/cam", {"id": data["id"], "cam": "magic_cam", "cam_layer": "layer2"})
    assert status == 400 and "magic_cam" in err["error"] and "unknown CAM method" in err["error"]
    status, err = _post(server + "/api/cam", {"id": data["id"], "cam": "grad_cam", "cam_layer": "layer9"})
    assert status == 400 and "layer9" in err["error"] and "unknown CAM layer" in err["error"]
    status, err = _post(server + "/api/cam", {"id": data["id"], "cam": "cam", "cam_layer": "layer3+layer4"})
    assert status == 400 and "layer3+layer4" in err["error"] and "Traceback" not in err["error"]
    status, err = _post(server + "/api/open", {"path": image_path, "cam": "nope"})
    assert status == 400 and "nope" in err["error"]
    status, err = _post(server + "/api/cam", {"id": "ffff", "cam": "grad_cam"})
    assert status == 404 and "unknown image id" in err["error"]


@pytest.fixture(scope="module")
def dataset_spec(tmp_path_factory) -> str:
    """A tiny synthetic dataset (test_pipeline.make_synthetic: one abnormal study with masks), all in 'test'."""
    out = _pipeline_helpers().make_synthetic(tmp_path_factory.mktemp("viewdata") / "data")
    return f"synthetic:{out}:test"


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_dataset_open_by_index(server, dataset_spec):
    """List a split, open an abnormal item by index: its label and the Dice against its mask come back."""
    import urllib.parse
    status, listing = _get(server + "/api/dataset?spec=" + urllib.parse.quote(dataset_spec))
    assert status == 200, listing
    assert listing["count"] == len(listing["items"]) > 1 and "split 'test'" in listing["description"]
    abnormal = [it for it in listing["items"] if it["label"] == 1 and it["has_mask"]]
    assert abnormal, listing["items"]
    i = abnormal[0]["index"]
    status, data = _post(server + "/api/open", {"dataset": dataset_spec, "index": i})
    assert status == 200, data
    assert (data["index"], data["count"], data["label"]) == (i, listing["count"], 1)
    assert data["path"] == abnormal[0]["path"] and data["mask_path"]
    assert 0.0 <= data["dice"] <= 1.0
    w, h = Image.open(data["path"]).size
    assert _png(data["mask"]).shape == (h, w)
    status, again = _post(server + "/api/cam", {"id": data["id"], "cam": "eigen_cam"})  # Dice follows the map
    assert status == 200 and 0.0 <= again["dice"] <= 1.0
    status, boxed = _post(server + "/api/box", {"id": data["id"], "box": [0, 0, w / 2, h / 2]})  # and the box
    assert status == 200 and 0.0 <= boxed["dice"] <= 1.0
    normal = [it for it in listing["items"] if it["label"] == 0 and not it["has_mask"]]
    if normal:
        status, plain = _post(server + "/api/open", {"dataset": dataset_spec, "index": normal[0]["index"]})
        assert status == 200 and plain["label"] == 0 and "dice" not in plain

    # Bad index / spec: a JSON error naming it.
    n = listing["count"]
    for bad in (-1, n):
        status, err = _post(server + "/api/open", {"dataset": dataset_spec, "index": bad})
        assert status == 400 and f"index {bad} out of range" in err["error"] and str(n) in err["error"], err
    status, err = _post(server + "/api/open", {"dataset": dataset_spec, "index": "two"})
    assert status == 400 and "index" in err["error"] and "'two'" in err["error"]
    bad_spec = "nosuchkind:/tmp:test"
    status, err = _post(server + "/api/open", {"dataset": bad_spec, "index": 0})
    assert status == 400 and "bad dataset" in err["error"] and bad_spec in err["error"]
    missing = dataset_spec.replace(":test", "_missing:test")
    status, err = _get(server + "/api/dataset?spec=" + urllib.parse.quote(missing))
    assert status == 400 and "folder not found" in err["error"] and "Traceback" not in err["error"]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver on PATH "
                    "(Debian: apt-get install chromium chromium-driver)")
def test_browser_drag_box_gets_mask(server, image_path, dataset_spec):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--window-size=1200,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 120)
        # A bad path first: the page shows the server's message.
        driver.find_element(By.ID, "path").send_keys("/no/such/file.png")
        driver.find_element(By.ID, "open").click()
        wait.until(lambda d: "no such file" in d.find_element(By.ID, "error").text)

        field = driver.find_element(By.ID, "path")
        field.clear()
        field.send_keys(image_path)
        driver.find_element(By.ID, "open").click()
        canvas = driver.find_element(By.ID, "canvas")
        wait.until(lambda d: canvas.get_attribute("data-masks") == "1")
        assert driver.find_element(By.ID, "error").text == ""
        assert "P(abnormal)" in driver.find_element(By.ID, "prob").text
        assert "grad_cam" in driver.find_element(By.ID, "prob").text
        w, h = Image.open(image_path).size
        assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (w, h)

        rect = canvas.rect  # CSS pixels; offsets below are from the canvas centre
        dx, dy = rect["width"] * 0.25, rect["height"] * 0.25
        (ActionChains(driver).move_to_element_with_offset(canvas, -int(dx), -int(dy)).click_and_hold()
         .move_by_offset(int(dx), int(dy)).move_by_offset(int(dx) // 2, int(dy) // 2).release().perform())
        wait.until(lambda d: canvas.get_attribute("data-masks") == "2" or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        assert canvas.get_attribute("data-masks") == "2"
        assert "mask for box" in driver.find_element(By.ID, "status").text
        link = driver.find_element(By.ID, "download")
        assert link.is_displayed() and link.get_attribute("href").startswith("data:image/png;base64,")
        assert _png(link.get_attribute("href")).shape == (h, w)

        # A box outside the image, sent as the page sends it: the message shows in the page.
        driver.execute_script("window.mskjaxView.sendBox([%d, %d, %d, %d])" % (w + 5, h + 5, w + 40, h + 40))
        wait.until(lambda d: "outside the image" in d.find_element(By.ID, "error").text)
        # Another CAM method from the select: the map is recomputed and the page names it.
        from selenium.webdriver.support.ui import Select
        Select(driver.find_element(By.ID, "cam-method")).select_by_value("eigen_cam")
        wait.until(lambda d: d.find_element(By.ID, "prob").get_attribute("data-cam") == "eigen_cam"
                   or "map failed" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "error").text == ""
        assert "eigen_cam" in driver.find_element(By.ID, "prob").text
        assert canvas.get_attribute("data-masks") == "3"
        # A dataset split: list it, open the next item; the page shows its label.
        driver.find_element(By.ID, "dataset").send_keys(dataset_spec)
        driver.find_element(By.ID, "next").click()
        wait.until(lambda d: "label:" in d.find_element(By.ID, "truth").text or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        assert driver.find_element(By.ID, "index").get_attribute("value") == "1"
        assert int(driver.find_element(By.ID, "dataset-info").get_attribute("data-count")) > 1
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/" not in e["message"]]
        assert not severe, severe
    finally:
        driver.quit()


def test_viewer_config_takes_a_map_trained_sams_map_and_box():
    import argparse
    from mskjax.pipeline import PipelineConfig, check_map_prompt, map_prompt_settings
    from mskjax.view import viewer_config
    trained_on = PipelineConfig(cam="layer_cam", cam_layer="layer2", box_side=64.0)
    meta = {"map_prompt": {**map_prompt_settings(trained_on), "classifier": "c"}}
    args = argparse.Namespace(cam=None, boxes="peak", threshold=0.5)
    got = viewer_config(args, "grad_cam", None, meta)
    check_map_prompt(meta["map_prompt"], got)  # what the pipeline would otherwise refuse
    assert got.map_prompt and got.cam == "layer_cam" and got.box_side == 64.0
    other = viewer_config(argparse.Namespace(cam="grad_cam", boxes="peak", threshold=0.5), "grad_cam", None, meta)
    assert other.cam == "grad_cam" and other.box_side == 64.0 and other.map_prompt is False
    plain = viewer_config(args, "grad_cam", None, {})
    assert plain == PipelineConfig(cam="grad_cam", boxes="peak", threshold=0.5)
    from mskjax.view import build_parser
    parsed = build_parser().parse_args(["--classifier", "c", "--sam", "s", "--probability-flips", "hv"])
    assert viewer_config(parsed, "grad_cam", None, {}).probability_flips == "hv"
    assert viewer_config(build_parser().parse_args(["--classifier", "c", "--sam", "s"]), "grad_cam", None,
                         {}).probability_flips == "none"
