"""Data-parallel classifier training from one CPU to a TPU pod.

    python -m mskjax.train --config configs/synthetic.py --workdir runs/synthetic \
        [--config.train.batch_size=64 ...]

One jitted train step with donated state over a ('data',) mesh: batches sharded on their leading
axis, parameters replicated (created already sharded), BatchNorm statistics computed over the
global batch. Checkpoints every epoch (last N kept, asynchronous, with the data iterator's position);
the best validation kappa is exported as an mskjax checkpoint in WORKDIR/best, which
`mskjax.segment` and `--config.init_from` read. Restarting the same command resumes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mskjax import checkpoint, distributed, metrics, optim
from mskjax.config_base import ConfigError, validate
from mskjax.run_checkpoints import CheckpointWriteError, release_free_heap

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# Model and state

def model_variant(config) -> dict[str, Any]:
    m = config.model
    v: dict[str, Any] = {"padding": m.padding, "dtype": m.dtype}
    if m.arch.startswith("efficientnet"):
        v["stochastic_depth"] = m.stochastic_depth
        if m.dropout >= 0:
            v["dropout"] = m.dropout
        if m.depthwise_impl:
            v["depthwise_impl"] = m.depthwise_impl
    return v


def normalization(config) -> dict[str, Any]:
    """What the model expects as input, in the checkpoint-contract form."""
    c = config.model.in_channels
    if config.data.normalization == "imagenet":
        mean, std = IMAGENET["mean"], IMAGENET["std"]
        if c == 1:  # a one-channel stem summed from RGB sees the gray value on every channel
            mean, std = [float(np.mean(mean))], [float(np.mean(std))]
        return {"input_range": [0.0, 1.0], "mean": mean, "std": std}
    if config.data.normalization == "per_image":
        return {"input_range": [0.0, 1.0], "mean": [0.0] * c, "std": [1.0] * c, "per_image": True}
    return {"input_range": [0.0, 1.0], "mean": [0.0] * c, "std": [1.0] * c}


def normalization_from_metadata(norm: dict) -> dict[str, Any]:
    """A checkpoint's "normalization" metadata -> the `norm` argument of prepare_images (defaults:
    mean 0, std 1, no per-image standardisation). input_range is the caller's to check."""
    return {"mean": norm.get("mean", [0.0]), "std": norm.get("std", [1.0]),
            "per_image": bool(norm.get("per_image", False))}


PER_IMAGE_MIN_STD = 1e-3  # a blank (or padding) image stays blank instead of dividing by ~0


def prepare_images(images: jax.Array, norm: dict, channels: int) -> jax.Array:
    """(B, H, W, 1|C) in [0, 1] -> model input (B, H, W, channels), normalised.

    norm["per_image"] (optional, default False): first standardise each image to zero mean and unit
    standard deviation over all its pixels and channels (std floored at PER_IMAGE_MIN_STD), which
    takes exposure, gamma and contrast differences between radiographs off the model's hands; then
    (x - mean) / std with the checkpoint's mean and std."""
    if images.shape[-1] == 1 and channels == 3:
        images = jnp.repeat(images, 3, axis=-1)
    if norm.get("per_image", False):
        images = images.astype(jnp.float32)
        m = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
        s = jnp.std(images, axis=(1, 2, 3), keepdims=True)
        images = (images - m) / jnp.maximum(s, PER_IMAGE_MIN_STD)
    mean = jnp.asarray(norm["mean"], jnp.float32)
    std = jnp.asarray(norm["std"], jnp.float32)
    return (images - mean) / std


def init_variables(model, config, key) -> dict:
    side = config.data.image_size
    return model.init(key, jnp.zeros((1, side, side, config.model.in_channels), jnp.float32), train=False)


def variables_from_checkpoint(directory: str, model, config, key) -> dict:
    """Starts from a converted checkpoint: adapts a 3-channel stem to 1 channel (sum over inputs)
    and re-initialises the head when the number of classes differs."""
    from mskjax.weights import HEAD, STEM
    src_model, src, meta = checkpoint.load_model(directory)
    if meta["arch"] != config.model.arch:
        raise ConfigError(f"config.init_from: {directory} holds {meta['arch']}, config.model.arch is {config.model.arch}")
    fresh = init_variables(model, config, key)
    fam = "resnet" if config.model.arch.startswith("resnet") else "efficientnet"
    params = jax.tree.map(np.asarray, src["params"])
    if meta["in_channels"] != config.model.in_channels:
        k = params[STEM[fam]]["kernel"]
        if meta["in_channels"] == 3 and config.model.in_channels == 1:
            params[STEM[fam]]["kernel"] = k.sum(axis=2, keepdims=True)
        else:
            raise ConfigError(f"config.init_from: cannot adapt {meta['in_channels']} input channels to "
                              f"{config.model.in_channels}")
    if meta["num_classes"] != config.model.num_classes:
        params[HEAD[fam]] = jax.tree.map(np.asarray, fresh["params"][HEAD[fam]])
    out = {"params": params, "batch_stats": src.get("batch_stats", {})}
    checkpoint.check_tree(out, fresh, f"init_from {directory}")
    return out


def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """The MURA paper's weighted cross-entropy: abnormal examples weighted by the normal fraction,
    normal ones by the abnormal fraction (over the whole training split)."""
    n = len(labels)
    a = float(np.sum(labels))
    if n == 0 or a == 0 or a == n:
        return 1.0, 1.0
    return (n - a) / n, a / n  # (w_abnormal, w_normal)


def loss_fn(logits: jax.Array, labels: jax.Array, valid: jax.Array, *, num_classes: int,
            w_pos: float, w_neg: float, label_smoothing: float) -> jax.Array:
    """Mean loss over valid rows. One logit: weighted binary cross-entropy; more: softmax CE."""
    valid = valid.astype(jnp.float32)
    if num_classes == 1:
        y = labels.astype(jnp.float32)
        t = y * (1 - label_smoothing) + 0.5 * label_smoothing
        z = logits[:, 0]
        per = -(w_pos * t * jax.nn.log_sigmoid(z) + w_neg * (1 - t) * jax.nn.log_sigmoid(-z))
    else:
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        per = optax.softmax_cross_entropy(logits, onehot)
    return jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def probabilities(logits: jax.Array) -> jax.Array:
    """Probability of abnormal: sigmoid of a single logit, else softmax class 1."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[:, 0])
    return jax.nn.softmax(logits, axis=-1)[:, 1]


# ---------------------------------------------------------------------------------------------
# Steps

def make_train_step(model, tx, config, norm, w_pos, w_neg, augment_fn):
    ema_decay = config.train.ema_decay
    channels = config.model.in_channels

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        k_aug, k_drop = jax.random.split(key)
        images = batch["image"]
        if augment_fn is not None:
            images = augment_fn(k_aug, images)
        images = prepare_images(images, norm, channels)

        def compute(params):
            logits, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                                          train=True, rngs={"dropout": k_drop}, mutable=["batch_stats"])
            loss = loss_fn(logits, batch["label"], batch["valid"], num_classes=config.model.num_classes,
                           w_pos=w_pos, w_neg=w_neg, label_smoothing=config.train.label_smoothing)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=state["step"] + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if ema_decay > 0:
            new["ema"] = optim.ema_update(state["ema"], params, ema_decay)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def make_eval_step(model, config, norm):
    channels = config.model.in_channels

    def step(variables, images):
        logits = model.apply(variables, prepare_images(images, norm, channels), train=False)
        return probabilities(logits)

    return step


# ---------------------------------------------------------------------------------------------
# The loop

def _log(msg: str) -> None:
    if distributed.is_main_process():
        print(msg, flush=True)


def resident_mb() -> float | None:
    """This process's resident memory in MiB (Linux /proc; None where unavailable). Logged so that
    a long run shows a leak (tools/soak.py checks it)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _host(x) -> np.ndarray:
    """A (possibly multi-process) global array -> the full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def make_loader(records, config, *, train: bool, sharding, seed: int, state=None):
    from mskjax.data.loader import Loader
    kwargs = dict(global_batch_size=config.train.batch_size if train else config.eval.batch_size,
                  image_size=config.data.image_size, mode=config.data.mode, channels=1,
                  shuffle=train, seed=seed, num_epochs=None if train else 1, drop_remainder=train,
                  sharding=sharding, workers=config.data.workers, cache=config.data.cache)
    if state is not None:
        kwargs["state"] = state
    return Loader(records, **kwargs)


def evaluate(eval_step, variables, records, config, sharding, loader=None) -> dict:
    """Image probabilities for every record (each exactly once) and the classification report.

    `loader`: an evaluation loader over `records` (`make_loader(records, ..., train=False)`) to
    reuse; it is rewound to its start, so its cache of decoded images carries over from one
    validation pass to the next. None builds (and closes) one for this call."""
    own = loader is None
    if own:
        loader = make_loader(records, config, train=False, sharding=sharding, seed=0)
    else:
        loader.restore({"epoch": 0, "step": 0, "seed": loader.seed})
    probs = np.full(len(records), np.nan, np.float64)
    try:
        for batch in loader:
            p = _host(eval_step(variables, batch["image"]))
            idx = np.asarray(batch["index"]) if not isinstance(batch["index"], jax.Array) else _host(batch["index"])
            valid = np.asarray(batch["valid"]) if not isinstance(batch["valid"], jax.Array) else _host(batch["valid"])
            probs[idx[valid]] = p[valid]
    finally:
        if own:
            loader.close()
    skipped = list(getattr(loader, "skipped", []))
    seen = ~np.isnan(probs)
    keep = [i for i in range(len(records)) if seen[i]]
    labels = np.array([records[i].label for i in keep])
    studies = np.array([records[i].study for i in keep])
    report = metrics.classification_report(
        probs[keep], labels, studies, np.array([records[i].body_part for i in keep]),
        threshold=config.eval.threshold, n_bootstrap=config.eval.bootstrap, seed=config.seed)
    if any(records[i].box_types for i in keep):  # datasets with typed ground truth (synthetic, FracAtlas)
        report["by_abnormality_type"] = metrics.auroc_by_type(probs[keep], labels, studies,
                                                              [records[i].box_types for i in keep])
    report["skipped"] = [f"{p}: {r}" for p, r in skipped]
    report["n_unreadable"] = int((~seen).sum())
    return {"report": report, "probs": probs}


def warm_up_eval(eval_step, variables, loader) -> None:
    """Runs the evaluation step once on the first batch of `loader` (the validation loader) before
    training, so that its compilation (time, memory, any error) comes at start-up with the train
    step's instead of after the first epoch; the memory that compilation leaves free is handed back."""
    for batch in loader:
        jax.block_until_ready(eval_step(variables, batch["image"]))
        break
    release_free_heap()


def summary_table(report: dict) -> str:
    rows = [("overall", report["overall"])] + sorted(report.get("by_body_part", {}).items())
    lines = [f"{'group':<14}{'images':>7}{'studies':>8}{'img AUROC':>10}{'st AUROC':>9}{'kappa':>7}"
             f"{'acc':>7}{'sens':>7}{'spec':>7}"]
    for name, g in rows:
        s, i = g["study"], g["image"]
        lines.append(f"{name:<14}{g['n_images']:>7}{g['n_studies']:>8}{i['auroc']['value']:>10.4f}"
                     f"{s['auroc']['value']:>9.4f}{s['kappa']['value']:>7.3f}{s['accuracy']['value']:>7.3f}"
                     f"{s['sensitivity']['value']:>7.3f}{s['specificity']['value']:>7.3f}")
    for name, t in report.get("by_abnormality_type", {}).items():
        lines.append(f"{name + ' v normal':<21}{t['n_studies']:>8}{t['image_auroc']:>10.4f}{t['study_auroc']:>9.4f}"
                     f"   ({t['n_images']} abnormal images)")
    return "\n".join(lines)


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Trains, keeps the best checkpoint by validation kappa, evaluates it on the test split.
    Returns {"valid": report, "test": report | None, "best_step", "workdir"}."""
    from mskjax.datasets import load_splits
    from mskjax.models import create
    from mskjax.run_checkpoints import RunCheckpoints

    workdir = Path(workdir).absolute()
    mesh = distributed.data_mesh()
    validate(config, jax.device_count())
    data_sharding = distributed.batch_sharding(mesh)
    repl = distributed.replicated(mesh)
    if distributed.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    _log(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}")

    splits = load_splits(config.data, seed=config.seed)
    for split, s in splits.skipped:
        _log(f"skipped ({split}): {s}")
    train_records = splits.records["train"]
    if not train_records:
        raise ConfigError(f"config.data: no training images found ({splits.description})")
    _log(f"data: {splits.description}; " + ", ".join(f"{k} {len(v)}" for k, v in splits.records.items()))

    model = create(config.model.arch, num_classes=config.model.num_classes, **model_variant(config))
    norm = normalization(config)
    steps_per_epoch = max(1, len(train_records) // config.train.batch_size)
    total_steps = steps_per_epoch * config.train.epochs
    lr = optim.schedule(config.train.learning_rate, total_steps, int(config.train.warmup_epochs * steps_per_epoch))
    tx = optim.make_optimizer(config.train.optimizer, lr, config.train.weight_decay, config.train.momentum,
                              config.train.grad_clip)
    w_pos, w_neg = class_weights(np.array([r.label for r in train_records])) if config.train.class_weighting else (1.0, 1.0)

    root_key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(root_key)

    def init_state():
        if config.init_from:
            v = variables_from_checkpoint(config.init_from, model, config, init_key)
            v = jax.tree.map(jnp.asarray, v)
        else:
            v = init_variables(model, config, init_key)
        state = {"step": jnp.zeros((), jnp.int32), "params": v["params"], "batch_stats": v.get("batch_stats", {}),
                 "opt_state": tx.init(v["params"]), "rng": state_key}
        if config.train.ema_decay > 0:
            state["ema"] = v["params"]
        return state

    if config.init_from:  # reading files cannot happen inside jit: build on host, then place
        state = jax.device_put(init_state(), repl)
    else:
        state = jax.jit(init_state, out_shardings=repl)()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)

    ckpts = RunCheckpoints(workdir / "checkpoints", keep=config.checkpoint.keep,
                           async_writes=config.checkpoint.async_writes)
    data_state, best = None, {"kappa": -math.inf, "step": -1}
    restored = ckpts.restore_latest(abstract, log=_log)
    if restored is not None:
        step0, state, saved = restored
        data_state, best = saved["loader"], saved["best"]
        _log(f"resumed from the checkpoint at step {step0} in {ckpts.directory}")

    augment_fn = None
    if config.data.augment:
        from mskjax.data import augment as aug
        augment_fn = partial(aug.augment, config=aug.AugmentConfig())
    train_step = jax.jit(make_train_step(model, tx, config, norm, w_pos, w_neg, augment_fn),
                         in_shardings=(repl, data_sharding), out_shardings=(repl, repl), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, config, norm), in_shardings=(repl, data_sharding), out_shardings=data_sharding)

    loader = make_loader(train_records, config, train=True, sharding=data_sharding, seed=config.seed, state=data_state)
    it = iter(loader)
    writer = _tensorboard(workdir) if distributed.is_main_process() else None
    log_file = open(workdir / "metrics.jsonl", "a") if distributed.is_main_process() else None

    step = int(_host(state["step"]))
    # One validation loader for the whole run: its cache keeps the decoded images between passes.
    valid_loader = (make_loader(splits.records["valid"], config, train=False, sharding=data_sharding, seed=0)
                    if splits.records["valid"] else None)
    if valid_loader is not None and step < total_steps:
        warm_up_eval(eval_step, {"params": state.get("ema", state["params"]), "batch_stats": state["batch_stats"]},
                     valid_loader)
    ckpt_every = config.checkpoint.every_steps or steps_per_epoch
    t_start, images_seen, t_window, n_window = time.time(), 0, time.time(), 0
    last_saved = ckpts.latest_step()
    try:
        while step < total_steps:
            batch = next(it)
            state, m = train_step(state, {k: batch[k] for k in ("image", "label", "valid")})
            step += 1
            n_window += config.train.batch_size
            loss = float(_host(m["loss"]))
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss ({loss}) at step {step}; stopping. The last good checkpoint is "
                    f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {ckpts.directory}")
            if step % config.train.log_every == 0 or step == total_steps:
                ckpts.poll()  # a finished checkpoint write: surface its error now
                # Free heap back to the OS at every log step, not only after checkpoints: what the
                # steps' temporaries and the loader threads free stays in glibc's per-thread arenas,
                # and without this the soak's resident memory wandered by tens of MB between
                # checkpoints (tools/soak.py). Costs milliseconds per log step.
                release_free_heap()
                now = time.time()
                ips = n_window / max(now - t_window, 1e-9)
                eta = (total_steps - step) * config.train.batch_size / max(ips, 1e-9)
                _log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {loss:.4f} "
                     f"lr {float(lr(step)):.2e} {ips:.1f} img/s eta {_fmt_time(eta)}")
                _write(log_file, writer, step, {"train/loss": loss, "train/lr": float(lr(step)),
                                                "train/images_per_s": ips,
                                                "train/grad_norm": float(_host(m["grad_norm"])),
                                                "train/rss_mb": resident_mb()})
                t_window, n_window = now, 0
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch and (step // steps_per_epoch) % config.eval.every_epochs == 0 or step == total_steps:
                variables = {"params": state.get("ema", state["params"]), "batch_stats": state["batch_stats"]}
                res = evaluate(eval_step, variables, splits.records["valid"], config, data_sharding, valid_loader)
                release_free_heap()  # evaluation's buffers are freed by now
                rep = res["report"]
                kappa = rep["overall"]["study"]["kappa"]["value"]
                auc = rep["overall"]["study"]["auroc"]["value"]
                _log(f"valid at step {step}: study AUROC {auc:.4f} kappa {kappa:.4f}")
                _write(log_file, writer, step, {"valid/study_auroc": auc, "valid/study_kappa": kappa,
                                                "valid/image_auroc": rep["overall"]["image"]["auroc"]["value"]})
                score = kappa if math.isfinite(kappa) else -1.0
                if score > best["kappa"]:
                    best = {"kappa": score, "step": step, "auroc": auc}
                    ckpts.wait()  # one collective write at a time: the step checkpoint may still be in flight
                    export_best(workdir / "best", variables, config, norm, step, rep)
                    release_free_heap()  # the export's host copy and Orbax buffers are freed by now
            if step % ckpt_every == 0 or step == total_steps:
                ckpts.save(step, state, {"loader": loader.state(), "best": best})
                last_saved = step
    except BaseException:
        if valid_loader is not None:
            valid_loader.close()
        raise
    finally:
        ckpts.close()
        if log_file:
            log_file.close()
        if writer:
            writer.close()

    # Final numbers come from the best checkpoint, never from the last step.
    result = {"workdir": str(workdir), "best_step": best["step"], "valid": None, "test": None}
    if (workdir / "best").is_dir():
        _, bv, _ = checkpoint.load_model(workdir / "best")
        bv = jax.device_put(jax.tree.map(jnp.asarray, bv), repl)
        for split in ("valid", config.eval.test_split):
            if split and splits.records.get(split):
                rep = evaluate(eval_step, bv, splits.records[split], config, data_sharding,
                               valid_loader if split == "valid" else None)["report"]
                result[split] = rep
                _log(f"\n{split} (best checkpoint, step {best['step']}):\n{summary_table(rep)}")
                if split == "valid":
                    _log(f"valid's study-level Youden threshold: {rep['youden_threshold']:.4f} "
                         "(a decision threshold chosen on valid, e.g. for mskjax.segment --threshold)")
    if valid_loader is not None:
        valid_loader.close()
    if distributed.is_main_process():
        (workdir / "results.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    _log(f"total time {_fmt_time(time.time() - t_start)}; results in {workdir / 'results.json'}")
    return result


def export_best(directory: Path, variables, config, norm, step: int, report: dict) -> None:
    host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
                        variables)
    variant = model_variant(config)
    meta = checkpoint.classifier_metadata(
        config.model.arch, config.model.num_classes, config.model.in_channels, config.data.image_size, variant, norm,
        {"format": "mskjax.train", "step": step, "dataset": config.data.dataset,
         "valid_study_kappa": report["overall"]["study"]["kappa"]["value"],
         "valid_study_auroc": report["overall"]["study"]["auroc"]["value"]})
    meta["data"] = {"mode": config.data.mode, "image_size": config.data.image_size}
    checkpoint.save(directory, host, meta, overwrite=True)


def _tensorboard(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: metrics.jsonl carries the same numbers
        return None
    return SummaryWriter(str(workdir / "tb"))


def _write(log_file, writer, step: int, values: dict) -> None:
    if log_file:
        log_file.write(json.dumps({"step": step, **values}) + "\n")
        log_file.flush()
    if writer:
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                writer.add_scalar(k, v, step)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def check_overrides(argv: list[str]) -> str | None:
    """An error message for any `--config.a.b=v` naming a field the config file lacks (listing the
    valid ones at that level), or None. Runs before absl parses, so a typo never becomes a
    traceback or a silent new field."""
    import importlib.util
    import ml_collections
    path = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return None
    if not Path(path).is_file():
        return f"config file not found: {path}"
    spec = importlib.util.spec_from_file_location("_mskjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        return f"{path} has no get_config()"
    config = module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        dotted = a[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                level = "config" + "".join("." + w for w in walked)
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (f"unknown config field --config.{dotted}: {level} has no field {part!r}; "
                        f"valid fields of {level}: {', '.join(valid)}")
            node = node[part]
            walked.append(part)
    return None


def main(argv=None) -> int:
    from absl import app, flags

    if argv is not None:  # config_flags reads its overrides from sys.argv itself
        sys.argv = list(argv)
    err = check_overrides(list(sys.argv))
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file; override fields with --config.a.b=v",
                                    lock_config=True)
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        FLAGS = flags.FLAGS
        config = FLAGS.config
        distributed.initialize(config.distributed.coordinator, config.distributed.num_processes,
                               config.distributed.process_id,
                               heartbeat_timeout_s=config.distributed.heartbeat_timeout_s or None)
        jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir).absolute() / ".jax_cache"))
        try:
            if config.get("kind", "classifier") == "sam":
                # SAM fine-tuning shares the mesh, checkpoints and CLI; its loop lives in train_sam.
                from mskjax import train_sam
                train_sam.train_and_evaluate(config, FLAGS.workdir)
            else:
                train_and_evaluate(config, FLAGS.workdir)
        except (ConfigError, TrainingDiverged, FileNotFoundError, CheckpointWriteError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 3 if isinstance(e, TrainingDiverged) else 4 if isinstance(e, CheckpointWriteError) else 2
        return 0

    try:
        app.run(run, argv=argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
