"""Interactive viewer: open a radiograph, see the pipeline's probability, CAM, box and mask, drag a box.

    python -m mskjax.view --classifier runs/synthetic/best --sam runs/sam/best [--port 0]

A local web page served on 127.0.0.1 only (stdlib `http.server`, plain JavaScript, no external
URL). Open a PNG, JPEG or DICOM file by its path on this machine's disk: the page shows the
probability, the CAM overlay with the box and mask `mskjax.pipeline.Pipeline` chose, and a canvas
on which a dragged box prompts SAM again. The SAM image embedding is computed once per opened
image and cached (`Viewer.open`), so a box costs one mask decode (`Viewer.prompt`). "Download mask"
saves the current mask as a 0/255 PNG in the original frame.

JSON API (what the page uses; every error is {"error": message} with status 400/404/500):
  GET  /api/config                                   -> CAM methods, layers (stages) and the defaults
  GET  /api/dataset?spec=KIND:DIR[:SPLIT]           -> the split's items (index, file, label, has_mask),
                                                        listed once and kept (`mskjax.inputs.items_from_dataset`)
  POST /api/open  {"path": str, "cam"?: str, "cam_layer"?: str}
                                                     -> image, probability, overlay, pipeline mask
  POST /api/open  {"dataset": spec, "index": int, "cam"?, "cam_layer"?}
                                                     -> the same for item `index` of the split, with its
                                                        label and, when it has a ground-truth mask, the
                                                        Dice of the shown mask against it ("dice")
  POST /api/cam   {"id": str, "cam": str, "cam_layer": str|null} -> the map (overlay, box, mask) again
                                                        for the open image with that method and layer
  POST /api/box   {"id": str, "box": [x0, y0, x1, y1]} (original-frame pixels) -> mask
  GET  /api/mask/<id>.png                            -> the image's latest mask as a PNG file

The CAM method (`mskjax.cam.METHODS`) and layer (a classifier stage, "last" / null for the last
feature map, or stages joined by "+" to fuse them) can be changed for the open image: the viewer
builds one `Pipeline` per (method, layer) on demand from the already-loaded models and keeps them.

A dataset spec is KIND:DIR[:SPLIT] (e.g. synthetic:runs/demo/data:test, fracatlas:DIR:valid), as
the command lines' --dataset.
"""
from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import io
import json
import logging
import re
import sys
import threading
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from mskjax import cam as camlib
from mskjax import checkpoint, compile_cache
from mskjax import geometry as geo
from mskjax import inputs as inputslib
from mskjax import metrics
from mskjax import sam as samfn
from mskjax import viz
from mskjax.data.images import decode_image
from mskjax.pipeline import (Item, Pipeline, PipelineConfig, PipelineError, default_cam, default_map_flips,
                             fit_map_prompt, read_mask,
                             trained_map_config)

log = logging.getLogger("mskjax.view")

MAX_BODY = 1 << 20  # JSON requests are small


class ViewError(ValueError):
    """Bad input from the page: reported as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> 0/255 gray PNG bytes (the downloadable mask)."""
    return png_bytes(np.asarray(mask, bool).astype(np.uint8) * 255)


def mask_layer_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> RGBA PNG: translucent cyan inside, a solid outline, transparent outside."""
    m = np.asarray(mask, bool)
    rgba = np.zeros(m.shape + (4,), np.uint8)
    rgba[..., :3] = viz.MASK_COLOR
    rgba[..., 3] = np.where(m, 90, 0)
    if m.any():
        rgba[viz.outline(m, max(1, round(max(m.shape) / 300))), 3] = 255
    return png_bytes(rgba)


class _Opened:
    """One opened image: its decoded pixels, SAM embedding and sizes, and its latest mask."""

    def __init__(self, path, image, embedding, input_size, mask):
        self.path, self.image, self.embedding, self.input_size, self.mask = path, image, embedding, input_size, mask
        self.gt = None  # the dataset item's ground-truth mask (H, W) bool, when opened from a split that has one
        self.lock = threading.Lock()

    def truth(self, mask) -> dict:
        """{"dice": Dice of `mask` against the ground truth} when there is one, else {}."""
        return {} if self.gt is None else {"dice": float(metrics.dice(np.asarray(mask, bool), self.gt))}


class Viewer:
    """The viewer's state and actions, independent of HTTP (the handler calls `open` and `prompt`).

    Keeps the last `cache_size` opened images (embedding included) by id, and up to `max_pipelines`
    pipelines by (CAM method, layer), `pipeline`'s own included (the default map)."""

    def __init__(self, pipeline: Pipeline, cache_size: int = 8, max_pipelines: int = 8):
        self.pipe = pipeline
        self.cache_size = int(cache_size)
        self.max_pipelines = max(1, int(max_pipelines))
        self.default_key = (pipeline.config.cam, pipeline.config.cam_layer or None)
        self._pipes: collections.OrderedDict[tuple, Pipeline] = collections.OrderedDict({self.default_key: pipeline})
        self._pipes_lock = threading.Lock()
        self._images: collections.OrderedDict[str, _Opened] = collections.OrderedDict()
        self._datasets: dict[str, tuple] = {}  # spec -> (items, skips, description), listed once
        self._datasets_lock = threading.Lock()
        self._lock = threading.Lock()  # one model call at a time
        model, box_mask, point_trained = pipeline.sam_model, pipeline.box_mask_prompt, pipeline.point_trained

        def decode(svars, emb, boxes):
            # A drawn box is a tight box: a SAM trained with peak points saw a padding point beside those.
            pts, lbl = samfn.padding_point_prompts(boxes.shape[:2]) if point_trained else (None, None)
            return samfn.decode_boxes(model, svars, emb, boxes, box_mask, pts, lbl)

        self._decode = jax.jit(decode)

    # -- maps --------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """The classifier's stages, in order (a CAM layer is one of them, or several joined by "+")."""
        return [str(s) for s in self.pipe.classifier.segments]

    def options(self) -> dict:
        return {"methods": list(camlib.METHODS), "layers": self.layers,
                "cam": self.default_key[0], "cam_layer": self.default_key[1]}

    def pipeline_for(self, method=None, layer=None) -> Pipeline:
        """The pipeline computing `method` at `layer` (None / "" / "last": the last feature map; None
        method: the default one), built on first use from the loaded models and kept."""
        if method is None or method == "":
            method = self.default_key[0]
        if not isinstance(method, str) or method not in camlib.METHODS:
            raise ViewError(f"unknown CAM method {method!r}: expected one of {list(camlib.METHODS)}")
        if layer in (None, "", "last"):
            layer = None
        elif not isinstance(layer, str):
            raise ViewError(f"unknown CAM layer {layer!r}: expected one of {self.layers + ['last']}")
        else:
            bad = [p for p in layer.split("+") if p not in self.layers]
            if bad or len(set(layer.split("+"))) != len(layer.split("+")):
                raise ViewError(f"unknown CAM layer {layer!r}: expected one of {self.layers + ['last']} "
                                "(or stages joined by '+')")
        key = (method, layer)
        with self._pipes_lock:
            pipe = self._pipes.get(key)
            if pipe is not None:
                self._pipes.move_to_end(key)
                return pipe
            base = self.pipe
            try:
                # A SAM trained on one map keeps its map prompt for that map, the plain box for others.
                config = fit_map_prompt(dataclasses.replace(base.config, cam=method, cam_layer=layer, map_prompt=True),
                                        base.sam_meta)
                pipe = Pipeline(base.classifier, base.classifier_variables, base.classifier_meta, base.sam_model,
                                base.sam_variables, base.sam_meta, config)
            except PipelineError as e:
                raise ViewError(f"cannot compute CAM {method!r} at layer {layer or 'last'!r}: {e}") from None
            self._pipes[key] = pipe
            while len(self._pipes) > self.max_pipelines:  # drop the least recently used, never the default
                old = next(k for k in self._pipes if k != self.default_key)
                del self._pipes[old]
            return pipe

    def _run_map(self, pipe: Pipeline, image: np.ndarray, path: str, embed: bool):
        with self._lock:
            batch = pipe.prepare([image], 1)
            embeddings = pipe.sam_embeddings(batch)  # (1, e, e, C): the step's, kept for dragged boxes
            out = pipe.step(batch, embeddings)
            result = pipe.finish(batch, out, 0, image, Item(path=path, study="view"), None)
        return batch, result, (embeddings if embed else None)

    def _map_reply(self, key: str, pipe: Pipeline, image: np.ndarray, result) -> dict:
        h, w = image.shape
        over = viz.overlay(image, result.cam, result.boxes, result.mask, min_side=1, max_side=max(h, w))
        cam = np.asarray(result.cam)
        py, px = np.unravel_index(int(np.argmax(cam)), cam.shape) if cam.size else (0, 0)
        return {
            "id": key, "width": w, "height": h,
            "probability": result.probability, "predicted": result.predicted, "threshold": pipe.config.threshold,
            "cam": pipe.config.cam, "cam_layer": pipe.config.cam_layer,
            "cam_peak": [int(px), int(py)],
            "boxes": [[float(v) for v in b] for b in result.boxes],
            "mask_area": int(result.mask.sum()),
            "overlay": data_url(png_bytes(over)),
            "mask": data_url(mask_png(result.mask)),
            "mask_layer": data_url(mask_layer_png(result.mask)),
            "mask_url": f"/api/mask/{key}.png",
        }

    # -- actions ---------------------------------------------------------------------------
    def open(self, path: str, method=None, layer=None) -> dict:
        """Decode `path`, run the pipeline (the map `method` at `layer`, default: the viewer's) on it
        and embed it for SAM; JSON-able result."""
        if not isinstance(path, str) or not path.strip():
            raise ViewError("give the path of an image file (PNG, JPEG or DICOM)")
        path = path.strip()
        pipe = self.pipeline_for(method, layer) if (method or layer) else self.pipe
        try:
            image = decode_image(path).image
        except FileNotFoundError:
            raise ViewError(f"no such file: {path}", HTTPStatus.NOT_FOUND) from None
        except (OSError, ValueError) as e:  # ImageDecodeError (a ValueError): a folder, not an image ...
            raise ViewError(f"cannot read {path} as an image: {e}") from None
        batch, result, embedding = self._run_map(pipe, image, path, embed=True)
        key = uuid.uuid4().hex[:12]
        opened = _Opened(path, image, embedding, tuple(int(v) for v in batch["sam_input_sizes"][0]), result.mask)
        with self._lock:
            self._images[key] = opened
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)
        gray = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
        reply = self._map_reply(key, pipe, image, result)
        reply.update(path=path, image=data_url(png_bytes(gray)))
        return reply

    def dataset_items(self, spec) -> tuple:
        """(items, skips, description) of the split `spec` (KIND:DIR[:SPLIT]), listed on first use and kept."""
        if not isinstance(spec, str) or not spec.strip():
            raise ViewError("give a dataset as KIND:DIR[:SPLIT], e.g. synthetic:runs/demo/data:test")
        spec = spec.strip()
        with self._datasets_lock:
            listed = self._datasets.get(spec)
            if listed is None:
                try:
                    listed = inputslib.items_from_dataset(spec)
                except (inputslib.InputError, OSError, ValueError) as e:
                    raise ViewError(f"bad dataset {spec!r}: {e}") from None
                self._datasets[spec] = listed
        return listed

    def dataset(self, spec) -> dict:
        """The split's listing for the page (JSON-able)."""
        items, skips, description = self.dataset_items(spec)
        return {"spec": spec.strip(), "description": description, "count": len(items), "skipped": len(skips),
                "items": [{"index": i, "path": it.path, "name": Path(it.path).name, "label": it.label,
                           "has_mask": bool(it.mask_path)} for i, it in enumerate(items)]}

    def open_item(self, spec, index, method=None, layer=None) -> dict:
        """Open item `index` of the split `spec`: as `open`, plus its label and, when it has a
        ground-truth mask, the Dice of the pipeline's mask against it."""
        items, _, description = self.dataset_items(spec)
        if isinstance(index, bool) or not isinstance(index, (int, str)):
            raise ViewError(f"index must be a whole number, got {index!r}")
        try:
            i = int(index)
        except ValueError:
            raise ViewError(f"index must be a whole number, got {index!r}") from None
        if not 0 <= i < len(items):
            raise ViewError(f"index {i} out of range: {description} has {len(items)} item(s) "
                            f"(0..{len(items) - 1})" if items else f"index {i} out of range: {description} is empty")
        item = items[i]
        reply = self.open(item.path, method, layer)
        opened = self._get(reply["id"])
        gt_error = None
        if item.mask_path:
            try:
                opened.gt = read_mask(item.mask_path, opened.image.shape)
            except (OSError, ValueError) as e:
                gt_error = f"cannot read the ground-truth mask {item.mask_path}: {e}"
        reply.update(dataset=spec.strip(), index=i, count=len(items), label=item.label, study=item.study,
                     mask_path=item.mask_path or None, **opened.truth(opened.mask))
        if gt_error:
            reply["gt_error"] = gt_error
        return reply

    def rerun(self, key, method=None, layer=None) -> dict:
        """The map again for the open image `key` with `method` at `layer` (no re-decoding, no new
        SAM embedding); the image's latest mask becomes this run's pipeline mask."""
        opened = self._get(key)
        pipe = self.pipeline_for(method, layer)
        _, result, _ = self._run_map(pipe, opened.image, opened.path, embed=False)
        with opened.lock:
            opened.mask = result.mask
        reply = self._map_reply(key, pipe, opened.image, result)
        reply["path"] = opened.path
        reply.update(opened.truth(result.mask))
        return reply

    def prompt(self, key, box) -> dict:
        """SAM's mask for one box (x0, y0, x1, y1) in the image's original pixels."""
        opened = self._get(key)
        h, w = opened.image.shape
        try:
            b = np.asarray(box, np.float64)
        except (TypeError, ValueError):
            raise ViewError(f"box must be four numbers [x0, y0, x1, y1], got {box!r}") from None
        if b.shape != (4,):
            raise ViewError(f"box must be four numbers [x0, y0, x1, y1], got {box!r}")
        try:
            geo.validate_boxes(b, (h, w), name=f"box {[round(float(v), 1) for v in b]} (image {w}x{h})")
        except geo.InvalidBoxError as e:
            raise ViewError(str(e)) from None
        b = np.asarray(geo.clip_boxes(b, np.asarray([h, w], np.float64)), np.float64)
        if not (b[2] > b[0] and b[3] > b[1]):
            raise ViewError(f"box {box!r} has no area inside the image ({w}x{h})")
        img_size = self.pipe.sam_img_size
        boxes_sam = samfn.transform_boxes(b[None, None], (h, w), img_size).astype(np.float32)
        with self._lock:
            low = np.asarray(self._decode(self.pipe.sam_variables, opened.embedding, boxes_sam))[0, 0]
        mask = samfn.postprocess_host(low, opened.input_size, (h, w), img_size)
        with opened.lock:
            opened.mask = mask
        return {"id": key, "box": [float(v) for v in b], "width": w, "height": h, "mask_area": int(mask.sum()),
                "mask": data_url(mask_png(mask)), "mask_layer": data_url(mask_layer_png(mask)),
                "mask_url": f"/api/mask/{key}.png", **opened.truth(mask)}

    def mask_file(self, key: str) -> bytes:
        opened = self._get(key)
        with opened.lock:
            return mask_png(opened.mask)

    def _get(self, key) -> _Opened:
        with self._lock:
            opened = self._images.get(key) if isinstance(key, str) else None
        if opened is None:
            raise ViewError(f"unknown image id {key!r}: open the image again", HTTPStatus.NOT_FOUND)
        return opened


# ---------------------------------------------------------------------------------------------
# HTTP

def make_handler(viewer: Viewer):
    """A BaseHTTPRequestHandler class serving the page and the JSON API of `viewer`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "mskjax-view"

        def log_message(self, fmt, *args):  # quiet: requests go to the debug log only
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict):
            self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

        def _guard(self, fn):
            try:
                fn()
            except ViewError as e:
                self._json(e.status, {"error": str(e)})
            except (PipelineError, ValueError, OSError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # never a traceback to the page; the log keeps it
                log.exception("request %s failed", self.path)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(e).__name__}: {e})"})

        def do_GET(self):
            self._guard(self._get)

        def do_POST(self):
            self._guard(self._post)

        def _get(self):
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
                return
            if path == "/api/config":
                self._json(HTTPStatus.OK, viewer.options())
                return
            if path == "/api/dataset":
                query = urllib.parse.parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "")
                self._json(HTTPStatus.OK, viewer.dataset((query.get("spec") or [""])[0]))
                return
            m = re.fullmatch(r"/api/mask/([0-9a-f]+)\.png", path)
            if m:
                self._send(HTTPStatus.OK, viewer.mask_file(m.group(1)), "image/png",
                           {"Content-Disposition": f'attachment; filename="mask_{m.group(1)}.png"'})
                return
            raise ViewError(f"no such page: {path}", HTTPStatus.NOT_FOUND)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise ViewError(f"request too large ({n} bytes)")
            raw = self.rfile.read(n) if n else b""
            try:
                body = json.loads(raw.decode("utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ViewError(f"request body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise ViewError("request body must be a JSON object")
            return body

        def _post(self):
            path = self.path.split("?", 1)[0]
            if path == "/api/open":
                body = self._body()
                if body.get("dataset") is not None and body.get("path") is None:
                    self._json(HTTPStatus.OK, viewer.open_item(body["dataset"], body.get("index"), body.get("cam"),
                                                               body.get("cam_layer")))
                else:
                    self._json(HTTPStatus.OK, viewer.open(body.get("path"), body.get("cam"), body.get("cam_layer")))
            elif path == "/api/cam":
                body = self._body()
                self._json(HTTPStatus.OK, viewer.rerun(body.get("id"), body.get("cam"), body.get("cam_layer")))
            elif path == "/api/box":
                body = self._body()
                self._json(HTTPStatus.OK, viewer.prompt(body.get("id"), body.get("box")))
            else:
                raise ViewError(f"no such endpoint: {path}", HTTPStatus.NOT_FOUND)

    return Handler


def make_app(viewer: Viewer, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The server (not yet serving: call serve_forever, e.g. in a thread); port 0 picks a free one
    (server.server_address[1])."""
    server = ThreadingHTTPServer((host, int(port)), make_handler(viewer))
    server.daemon_threads = True
    return server


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mskjax viewer</title>
<link rel="icon" href="data:,">
<style>
 body{font-family:system-ui,sans-serif;margin:1em;background:#18191c;color:#e8e8e8}
 input[type=text]{width:40em} #error{color:#ff6b6b;white-space:pre-wrap;min-height:1.2em}
 #stage{position:relative;display:inline-block;margin-top:.5em} canvas{max-width:95vw;max-height:80vh;cursor:crosshair;border:1px solid #444}
 a{color:#6cf} .info span{margin-right:1.5em}
</style></head><body>
<h1>mskjax viewer</h1>
<form id="open-form"><label>Image path <input type="text" id="path" placeholder="/path/to/radiograph.png|.jpg|.dcm"></label>
 <button type="submit" id="open">Open</button>
 <label>CAM <select id="cam-method"></select></label>
 <label>layer <select id="cam-layer"></select></label></form>
<form id="dataset-form"><label>or dataset <input type="text" id="dataset" placeholder="KIND:DIR[:SPLIT], e.g. synthetic:runs/demo/data:test"></label>
 <button type="button" id="list">List</button>
 <button type="button" id="prev">&lt;</button><label> index <input type="number" id="index" value="0" min="0" step="1" style="width:6em"></label>
 <button type="button" id="next">&gt;</button> <button type="submit" id="open-item">Open item</button>
 <span id="dataset-info"></span></form>
<div id="error" role="alert"></div>
<div class="info"><span id="status">Open an image, then drag a box on it.</span>
 <span id="prob"></span><span id="area"></span><span id="truth"></span>
 <label><input type="checkbox" id="show-cam" checked> pipeline overlay (CAM, box, mask)</label>
 <a id="download" href="#" download="mask.png" hidden>download mask</a></div>
<div id="stage"><canvas id="canvas" width="1" height="1"></canvas></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
let cur = null, imgPlain = null, imgOverlay = null, maskLayer = null, userBox = null, drag = null;

function loadImage(src) {
  return new Promise((ok, bad) => { const im = new Image(); im.onload = () => ok(im);
    im.onerror = () => bad(new Error("image failed to load")); im.src = src; });
}
function showError(msg) { $("error").textContent = msg || ""; }
async function api(url, body) {
  let resp;
  try { resp = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)}); }
  catch (e) { throw new Error("server unreachable: " + e.message); }
  let data;
  try { data = await resp.json(); } catch (e) { throw new Error("bad reply from server (" + resp.status + ")"); }
  if (!resp.ok || data.error) throw new Error(data.error || ("HTTP " + resp.status));
  return data;
}
function draw() {
  if (!cur) return;
  const useOverlay = $("show-cam").checked && !userBox;
  ctx.drawImage(useOverlay ? imgOverlay : imgPlain, 0, 0, canvas.width, canvas.height);
  if (!useOverlay && maskLayer) ctx.drawImage(maskLayer, 0, 0);
  const lw = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 300));
  ctx.lineWidth = lw;
  const box = drag ? drag.box : userBox;
  if (box) { ctx.strokeStyle = "rgb(255,190,0)"; ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]); }
}
function setMask(data) {
  $("download").href = data.mask; $("download").hidden = false;
  $("area").textContent = "mask: " + data.mask_area + " px";
  canvas.dataset.maskArea = String(data.mask_area);
  canvas.dataset.masks = String(Number(canvas.dataset.masks || 0) + 1);
}
function showTruth(data) {
  const t = $("truth");
  if (data.dice === undefined) { if (!cur || cur.label === undefined) t.textContent = ""; delete t.dataset.dice; }
  else { t.dataset.dice = String(data.dice); }
  if (cur && cur.label !== undefined) {
    t.textContent = "label: " + (cur.label === null ? "?" : (cur.label ? "abnormal" : "normal")) +
      (data.dice !== undefined ? "; Dice vs ground truth = " + data.dice.toFixed(3) : (cur.mask_path ? "" : "; no ground-truth mask"));
  }
}
async function openWith(body, what) {
  showError(""); $("status").textContent = "running the pipeline...";
  try {
    const data = await api("/api/open", Object.assign(body, mapChoice()));
    [imgPlain, imgOverlay, maskLayer] = await Promise.all([loadImage(data.image), loadImage(data.overlay), loadImage(data.mask_layer)]);
    cur = data; userBox = null; drag = null;
    canvas.width = data.width; canvas.height = data.height;
    showMap(data);
    $("status").textContent = "opened " + data.path + " (" + data.width + "x" + data.height + "): drag a box to prompt SAM";
    canvas.dataset.imageId = data.id;
    if (data.index !== undefined) { $("index").value = String(data.index); $("status").textContent = "item " + data.index +
      " of " + data.count + ": " + $("status").textContent; }
    setMask(data); showTruth(data); draw();
  } catch (e) { showError(e.message); $("status").textContent = "open failed"; }
}
$("open-form").addEventListener("submit", (ev) => { ev.preventDefault(); openWith({path: $("path").value}); });
let listed = null;
async function listDataset() {
  const spec = $("dataset").value.trim();
  if (listed && listed.spec === spec) return listed;
  let resp, data;
  try { resp = await fetch("/api/dataset?spec=" + encodeURIComponent(spec)); }
  catch (e) { throw new Error("server unreachable: " + e.message); }
  try { data = await resp.json(); } catch (e) { throw new Error("bad reply from server (" + resp.status + ")"); }
  if (!resp.ok || data.error) { listed = null; $("dataset-info").textContent = ""; throw new Error(data.error || ("HTTP " + resp.status)); }
  listed = data; $("index").max = String(Math.max(0, data.count - 1));
  $("dataset-info").textContent = data.description + ": " + data.count + " item(s)" + (data.skipped ? ", " + data.skipped + " skipped" : "");
  $("dataset-info").dataset.count = String(data.count);
  return data;
}
$("list").addEventListener("click", async () => { showError(""); try { await listDataset(); } catch (e) { showError(e.message); } });
async function openItem(step) {
  showError("");
  try { await listDataset(); } catch (e) { showError(e.message); return; }
  let i = Number($("index").value || 0) + step;
  if (step && listed.count) i = Math.min(Math.max(i, 0), listed.count - 1);
  $("index").value = String(i);
  await openWith({dataset: $("dataset").value.trim(), index: i});
}
$("dataset-form").addEventListener("submit", (ev) => { ev.preventDefault(); openItem(0); });
$("prev").addEventListener("click", () => openItem(-1));
$("next").addEventListener("click", () => openItem(1));
function mapChoice() { return {cam: $("cam-method").value || null, cam_layer: $("cam-layer").value || null}; }
function showMap(data) {
  $("prob").textContent = "P(abnormal) = " + data.probability.toFixed(3) + (data.predicted ? " (abnormal)" : " (normal)") +
    " at threshold " + data.threshold + "; CAM " + data.cam + " at " + (data.cam_layer || "last");
  $("prob").dataset.cam = data.cam; $("prob").dataset.camLayer = data.cam_layer || "last";
  $("cam-method").value = data.cam; $("cam-layer").value = data.cam_layer || "last";
}
async function rerunMap() {
  if (!cur) return;
  showError(""); $("status").textContent = "computing the map...";
  try {
    const data = await api("/api/cam", Object.assign({id: cur.id}, mapChoice()));
    [imgOverlay, maskLayer] = await Promise.all([loadImage(data.overlay), loadImage(data.mask_layer)]);
    cur = Object.assign(cur, data); userBox = null; $("show-cam").checked = true;
    showMap(data); setMask(data); showTruth(data); draw();
    $("status").textContent = "map: " + data.cam + " at " + (data.cam_layer || "last") + "; drag a box to prompt SAM";
  } catch (e) { showError(e.message); $("status").textContent = "map failed"; }
}
$("cam-method").addEventListener("change", rerunMap);
$("cam-layer").addEventListener("change", rerunMap);
(async () => {
  try {
    const resp = await fetch("/api/config"), cfg = await resp.json();
    const fill = (sel, values, current) => { for (const v of values) { const o = document.createElement("option");
      o.value = v; o.textContent = v; sel.appendChild(o); } sel.value = current; };
    fill($("cam-method"), cfg.methods, cfg.cam);
    const layers = cfg.layers.slice(); layers.push("last");
    if (cfg.cam_layer && !layers.includes(cfg.cam_layer)) layers.push(cfg.cam_layer);  // e.g. fused "a+b"
    fill($("cam-layer"), layers, cfg.cam_layer || "last");
    document.body.dataset.ready = "1";
  } catch (e) { showError("cannot read the viewer's settings: " + e.message); }
})();
$("show-cam").addEventListener("change", () => { if ($("show-cam").checked) userBox = null; draw(); });
function toImage(ev) {
  const r = canvas.getBoundingClientRect();
  const x = (ev.clientX - r.left) * canvas.width / r.width, y = (ev.clientY - r.top) * canvas.height / r.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}
canvas.addEventListener("mousedown", (ev) => { if (!cur) return; const p = toImage(ev); drag = {start: p, box: [p[0], p[1], p[0], p[1]]}; ev.preventDefault(); });
window.addEventListener("mousemove", (ev) => { if (!drag) return; const p = toImage(ev), s = drag.start;
  drag.box = [Math.min(s[0], p[0]), Math.min(s[1], p[1]), Math.max(s[0], p[0]), Math.max(s[1], p[1])]; draw(); });
window.addEventListener("mouseup", async () => {
  if (!drag) return; const box = drag.box; drag = null;
  if (box[2] - box[0] < 1 || box[3] - box[1] < 1) { draw(); showError("drag a box: a click gives an empty box"); return; }
  sendBox(box);
});
async function sendBox(box) {
  showError(""); userBox = box; $("show-cam").checked = false; draw();
  $("status").textContent = "prompting SAM...";
  try {
    const data = await api("/api/box", {id: cur.id, box: box});
    maskLayer = await loadImage(data.mask_layer); userBox = data.box;
    setMask(data); showTruth(data); draw();
    $("status").textContent = "mask for box [" + data.box.map((v) => v.toFixed(0)).join(", ") + "]";
  } catch (e) { showError(e.message); $("status").textContent = "prompt failed"; }
}
window.mskjaxView = {sendBox: sendBox};
</script></body></html>
"""


# ---------------------------------------------------------------------------------------------
# CLI

def viewer_config(args, cam: str, cam_layer: str | None, sam_meta: dict, map_flips: str = "none") -> PipelineConfig:
    """The viewer's first pipeline settings. A SAM trained on a classifier's maps (metadata
    "map_prompt") gets the box it was trained with, and its map too unless --cam was given; a map
    other than the trained one gets the plain box prompt (`fit_map_prompt`). map_flips: the map's
    (`default_map_flips`), where no map-trained SAM decides it."""
    config = PipelineConfig(cam=cam, cam_layer=cam_layer, boxes=args.boxes, threshold=args.threshold,
                            map_flips=map_flips, probability_flips=getattr(args, "probability_flips", "none"))
    return fit_map_prompt(trained_map_config(config, sam_meta, map_too=args.cam is None), sam_meta)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mskjax.view", description=__doc__.split("\n")[0])
    ap.add_argument("--classifier", required=True, help="classifier checkpoint directory")
    ap.add_argument("--sam", required=True, help="SAM checkpoint directory")
    ap.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--cam", default=None, help="CAM method (mskjax.cam.METHODS; default: the map the classifier "
                    "was trained to localize with, from its checkpoint, else grad_cam)")
    ap.add_argument("--cam-layer", default=None, help="stage name for the CAM (default: as --cam, else the last "
                    "feature map)")
    ap.add_argument("--boxes", default="peak", help="box method: peak or threshold")
    ap.add_argument("--threshold", type=float, default=0.5, help="abnormal when P >= threshold")
    ap.add_argument("--probability-flips", choices=list(camlib.FLIPS), default="none",
                    help="P as the mean of the classifier's probabilities of the image and its flips (h: left-right; "
                         "hv: left-right, up-down and both), as `mskjax.segment --probability-flips` (the demo: hv)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    compile_cache.enable()  # the per-user compilation cache (mskjax.compile_cache)
    try:
        meta = checkpoint.read_metadata(args.classifier) if args.cam is None and Path(args.classifier).is_dir() else {}
        cam, cam_layer = default_cam(meta, args.cam, args.cam_layer)
        config = viewer_config(args, cam, cam_layer,
                               checkpoint.read_metadata(args.sam) if Path(args.sam).is_dir() else {},
                               default_map_flips(meta, args.cam, None))
        pipe = Pipeline.from_directories(args.classifier, args.sam, config)
    except (PipelineError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = make_app(Viewer(pipe), args.port)
    print(f"mskjax viewer on http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
