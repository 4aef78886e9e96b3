"""Trainer pieces in-process: loss, weighting, config checks, and that training learns and is
reproducible."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mskjax.classifier import prepare_images
from mskjax.train import classifier as train
from mskjax.train import optim
from mskjax.train.__main__ import check_overrides
from mskjax.train.config import ConfigError, base_config, load_config, validate, validate_sam
from mskjax.models import create

CONFIG_FILE = "tests/train/tiny_config.py"


def test_class_weights_follow_mura_paper():
    w_pos, w_neg = train.class_weights(np.array([1, 0, 0, 0]))
    assert (w_pos, w_neg) == (0.75, 0.25)
    assert train.class_weights(np.array([1, 1])) == (1.0, 1.0)


def test_weighted_bce_matches_manual():
    logits = jnp.array([[2.0], [-1.0], [0.5], [3.0]])
    labels = jnp.array([1, 0, 1, 0])
    valid = jnp.array([True, True, True, False])
    got = train.loss_fn(logits, labels, valid, num_classes=1, w_pos=0.7, w_neg=0.3, label_smoothing=0.1)
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5])))
    t = np.array([1, 0, 1]) * 0.9 + 0.05
    want = -(0.7 * t * np.log(p) + 0.3 * (1 - t) * np.log(1 - p)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unknown_override_lists_valid_fields():
    err = check_overrides(["x", f"--config={CONFIG_FILE}", "--config.train.batchsize=3"])
    assert "batchsize" in err and "batch_size" in err and "learning_rate" in err
    assert check_overrides(["x", f"--config={CONFIG_FILE}", "--config.train.batch_size=3"]) is None
    assert "no field 'nope'" in check_overrides(["x", "--config", CONFIG_FILE, "--config.nope.x=1"])
    assert "not found" in check_overrides(["x", "--config=configs/absent.py"])


def test_impossible_values_are_named():
    c = base_config()
    c.train.batch_size = 6
    with pytest.raises(ConfigError, match="train.batch_size.*4 devices"):
        validate(c, num_devices=4)
    c = base_config()
    c.train.learning_rate = -0.1
    with pytest.raises(ConfigError, match="learning_rate"):
        validate(c, num_devices=1)
    c = base_config()
    c.model.arch = "resnet5"
    with pytest.raises(ConfigError, match="model.arch"):
        validate(c, num_devices=1)
    c = base_config()
    c.eval.map_flips = "diagonal"
    with pytest.raises(ConfigError, match="eval.map_flips"):
        validate(c, num_devices=1)
    c.eval.map_flips, c.eval.subtract_normal_mean = "hv", True
    with pytest.raises(ConfigError, match="eval.map_flips"):
        validate(c, num_devices=1)
    c = base_config()
    c.model.cpu_convolutions = "onednn"
    with pytest.raises(ConfigError, match="model.cpu_convolutions.*'onednn'"):
        validate(c, num_devices=1)


def test_classifier_compiler_options_keep_the_training_step():
    """On CPU the classifier options ("eigen": convolutions on Eigen, dots and reductions on
    YNNPACK) are given exactly when this jaxlib compiles with them, and a ResNet training step
    compiled with them gives the default compile's loss and gradients to float rounding
    (relative to each leaf's largest gradient, as random-init ResNets amplify rounding)."""
    from mskjax import passes
    try:
        jax.jit(lambda x: x * 2).lower(jnp.zeros(2)).compile(dict(passes.CPU_CLASSIFIER_OPTIONS))
        known = True
    except Exception:  # noqa: BLE001 - XLA's own error type for an unknown option
        known = False
    opts = passes.classifier_compiler_options("eigen")
    assert opts == (dict(passes.CPU_CLASSIFIER_OPTIONS) if known and jax.default_backend() == "cpu" else {})
    assert passes.classifier_compiler_options("ynnpack") == {}
    with pytest.raises(ValueError, match="'mkl'"):
        passes.classifier_compiler_options("mkl")
    model = create("resnet18", num_classes=1)
    x = jnp.asarray(np.random.RandomState(0).rand(4, 64, 64, 3), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x, train=False)

    def loss(p):
        out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(out ** 2)

    step = jax.value_and_grad(loss)
    l_opt, g_opt = jax.jit(step, compiler_options=opts or None)(v["params"])
    l_def, g_def = jax.jit(step)(v["params"])
    np.testing.assert_allclose(float(l_opt), float(l_def), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_opt), jax.tree.leaves(g_def)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-3 * float(np.abs(b).max()) + 1e-12)


def test_no_weight_decay_on_norms_and_biases():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}}
    mask = optim.decay_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False}}


def _learnable_batch(n=16, side=32, seed=0):
    """Bright square present (label 1) or absent (label 0), at random places, random brightness."""
    rng = np.random.RandomState(seed)
    x = rng.rand(n, side, side, 1).astype(np.float32) * 0.3
    y = np.arange(n) % 2
    for i in np.nonzero(y)[0]:
        r, c = rng.randint(2, side - 10, 2)
        x[i, r:r + 8, c:c + 8] += 0.6
    return {"image": jnp.asarray(x), "label": jnp.asarray(y, jnp.int32), "valid": jnp.ones(n, bool)}


def _train(steps, seed=0):
    c = base_config()
    c.data.image_size = 32
    c.data.augment = False
    model = create("resnet18", num_classes=1)
    tx = optim.make_optimizer("adamw", optax.constant_schedule(1e-3), 1e-4, grad_clip=1.0)
    v = train.init_variables(model, c, jax.random.PRNGKey(seed))
    state = {"step": jnp.zeros((), jnp.int32), "params": v["params"], "batch_stats": v["batch_stats"],
             "opt_state": tx.init(v["params"]), "rng": jax.random.PRNGKey(seed + 1)}
    step = jax.jit(train.make_train_step(model, tx, c, train.normalization(c), 0.5, 0.5, None), donate_argnums=0)
    batch = _learnable_batch()
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_decreases_and_same_seed_gives_identical_parameters():
    s1, l1 = _train(12)
    s2, l2 = _train(12)
    assert np.mean(l1[-3:]) < 0.5 * np.mean(l1[:3]), l1
    assert l1 == l2
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[2] / "configs").glob("*.py")))
def test_every_shipped_config_validates(name):
    """Each configs/*.py loads and passes its validator (a typo or an out-of-range value in a shipped
    config would otherwise surface only when a user runs it)."""
    c = load_config(Path(__file__).parents[2] / "configs" / f"{name}.py")
    (validate_sam if c.get("kind") == "sam" else validate)(c, num_devices=1)


def test_config_beside_and_map_shaped_prompts(tmp_path):
    """configs/ files extend each other through config_beside (a missing base is named); the two
    map-prompt SAM configs are their bases plus exactly MAP_SHAPED_PROMPTS."""
    from mskjax.train.config import MAP_SHAPED_PROMPTS, config_beside
    configs = Path(__file__).parents[2] / "configs"
    for child, parent in (("sam_synthetic_map_prompts.py", "sam_synthetic.py"),
                          ("litemedsam_synthetic_map_prompts.py", "litemedsam_synthetic.py")):
        got, base = config_beside(str(configs / "x.py"), child), config_beside(str(configs / "x.py"), parent)
        differs = {k: v for k, v in got.data.items() if base.data[k] != v}
        assert differs == MAP_SHAPED_PROMPTS, child
        got.data.update(base.data)
        assert got.to_dict() == base.to_dict()
    with pytest.raises(FileNotFoundError, match="no_such_base.py"):
        config_beside(str(tmp_path / "mine.py"), "no_such_base.py")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(tmp_path / "nope.py")


def test_evaluation_loader_is_reused_without_decoding_again(tmp_path, monkeypatch):
    """A validation loader passed to `evaluate` is rewound each pass: the same probabilities
    every pass, every record exactly once, and its images decoded only on the first pass."""
    from PIL import Image

    from mskjax.data import loader as loader_mod
    from mskjax.data.records import Record

    rng = np.random.RandomState(0)
    records = []
    for i in range(7):  # 7 records, batch 4: the last batch is padded
        path = tmp_path / f"im{i}.png"
        Image.fromarray((rng.rand(40, 48) * 255).astype(np.uint8)).save(path)
        label = (i // 2) % 2
        records.append(Record(path=str(path), label=label, study=f"s{i // 2}", patient=f"p{i // 2}",
                              body_part="XR_HAND", view=i % 2, split="valid",
                              boxes=((1.0, 1.0, 9.0, 9.0),) if label else (), box_types=("lesion",) if label else ()))
    decodes = []
    real_decode = loader_mod.decode_image
    monkeypatch.setattr(loader_mod, "decode_image", lambda p: decodes.append(p) or real_decode(p))

    c = base_config()
    c.data.image_size, c.eval.batch_size, c.eval.bootstrap = 32, 4, 0
    model = create("resnet18", num_classes=1)
    variables = train.init_variables(model, c, jax.random.PRNGKey(0))
    eval_step = jax.jit(train.make_eval_step(model, c, train.normalization(c)))
    loader = train.make_loader(records, c, train=False, sharding=None, seed=0)
    try:
        train.warm_up_eval(eval_step, variables, loader)
        first = train.evaluate(eval_step, variables, records, c, None, loader)
        n_first = len(decodes)
        second = train.evaluate(eval_step, variables, records, c, None, loader)
        n_second = len(decodes)
    finally:
        loader.close()
    fresh = train.evaluate(eval_step, variables, records, c, None)
    assert sorted(set(decodes)) == sorted(r.path for r in records)
    assert n_first == n_second == len(records)  # the second pass decoded nothing
    assert np.isfinite(first["probs"]).all()
    np.testing.assert_array_equal(first["probs"], second["probs"])
    np.testing.assert_allclose(first["probs"], fresh["probs"], rtol=0, atol=1e-6)
    # typed ground truth: each type's AUROC against the normal cases, in the report and its table
    by_type = first["report"]["by_abnormality_type"]
    assert list(by_type) == ["lesion"] and by_type["lesion"]["n_studies"] == 2
    assert by_type["lesion"]["study_auroc"] == first["report"]["overall"]["study"]["auroc"]["value"]
    assert "lesion v normal" in train.summary_table(first["report"])
    untyped = [dataclasses.replace(r, boxes=(), box_types=()) for r in records]
    assert "by_abnormality_type" not in train.evaluate(eval_step, variables, untyped, c, None)["report"]


def test_per_image_normalisation():
    c = base_config()
    c.data.normalization = "per_image"
    validate(c, 1)
    norm = train.normalization(c)
    assert norm["per_image"] is True and norm["mean"] == [0.0] and norm["std"] == [1.0]
    rng = np.random.default_rng(0)
    images = np.stack([rng.uniform(0, 1, (8, 8, 1)) ** g for g in (0.5, 1.0, 2.0)] + [np.zeros((8, 8, 1))])
    x = np.asarray(prepare_images(jnp.asarray(images, jnp.float32), norm, 1))
    np.testing.assert_allclose(x[:3].mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[:3].std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    assert np.array_equal(x[3], np.zeros((8, 8, 1)))  # a blank (padding) image stays blank, not nan
    x3 = np.asarray(prepare_images(jnp.asarray(images, jnp.float32), dict(norm, mean=[0.0] * 3, std=[1.0] * 3), 3))
    np.testing.assert_allclose(x3, np.repeat(x, 3, axis=-1), atol=1e-6)
    # the others are untouched by the option's existence
    c.data.normalization = "none"
    assert "per_image" not in train.normalization(c)
