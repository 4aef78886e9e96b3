"""`scan_blocks` (each stage's repeated blocks as one nn.scan) against the usual modules: same
logits and batch statistics (float32, rtol = atol = 1e-5) and gradients (rtol 1e-4, atol 1e-5 x
the largest gradient) on converted variables, an exact layout round trip, stochastic depth in the
scanned blocks, and the trainer's option (state and exports keep the unscanned layout). Tiny
inputs (32 px); compile time is measured by tools/compile_time.py, not here."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mskjax.models import create
from mskjax.models.efficientnet import _traced_stochastic_depth
from mskjax.models.scan import groups_of, stack_blocks, to_scanned, to_unscanned, unstack_blocks

ARCHS = ("resnet18", "resnet50", "efficientnet_b0")
# Compiled in the tests (resnet50's layout is checked without). EfficientNet-B0's two compiled
# checks take ~2 min on 2 cores: marked slow (CI's budget); its layout round trip runs always.
RUN_ARCHS = ("resnet18", pytest.param("efficientnet_b0", marks=pytest.mark.slow))
TOL = dict(rtol=1e-5, atol=1e-5)
SIDE = 32


def _models(arch, **kw):
    return create(arch, num_classes=2, **kw), create(arch, num_classes=2, scan_blocks=True, **kw)


def _images(n=4, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, SIDE, SIDE, 3), jnp.float32)


def _shapes(model):
    return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.PRNGKey(0), _images(1))


def _random_variables(model, seed=0):
    """numpy variables of `model`'s structure, random values (no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), _shapes(model))


def _init(model):
    return jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.PRNGKey(0), _images(1))


_JITTED = {}


def _apply(model, **kw):
    """model.apply under jit (eager apply dispatches op by op: slow), one compile per (model, kw)."""
    key = (id(model), repr(sorted(kw.items())))
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(lambda v, x, rngs=None: model.apply(v, x, rngs=rngs, **kw)))
    return _JITTED[key][1]


# The differentiated tests run the last stages only (the compile of a whole backward pass is most of
# a test's time): EfficientNet-B0 from stage 5 (scans of 2 and 3 blocks), ResNet18 from layer 3.
START = {"resnet18": "layer2", "efficientnet_b0": "stage4"}


def _stage_input(model, arch, n=4, seed=1):
    shape = jax.eval_shape(lambda v, x: model.apply(v, x, method="features", layer=START[arch]),
                           _shapes(model), _images(n)).shape
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def _assert_trees_close(a, b, **tol):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], err_msg=k, **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_scanned_init_has_the_converted_structure(arch):
    plain, scanned = _models(arch)
    v, vs = _random_variables(plain), _shapes(scanned)
    conv = to_scanned(v, scanned.scan_groups())
    assert jax.tree.map(lambda a: (a.shape, a.dtype), conv) == jax.tree.map(lambda a: (a.shape, a.dtype), vs)
    # Only blocks after a stage's first are stacked, and every one of them is.
    keys = set(conv["params"])
    assert all(not k.endswith("_block1") for k in keys)
    assert {g for g in scanned.scan_groups()} <= keys
    if any(len(b) > 1 for b in scanned.scan_groups().values()):
        assert len(jax.tree.leaves(v)) > len(jax.tree.leaves(vs))


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_round_trip_is_exact(arch):
    plain, scanned = _models(arch)
    groups = scanned.scan_groups()
    v = _random_variables(plain)
    back = to_unscanned(to_scanned(v, groups), groups)
    fa, fb = _flat(v), _flat(back)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        assert fa[k].dtype == fb[k].dtype
    # the other direction, from the scanned model's own variables, under jit, and on params alone
    vs = jax.tree.map(jnp.asarray, _random_variables(scanned, 1))
    again = jax.jit(lambda t: to_scanned(to_unscanned(t, groups), groups))(vs)
    for k, a in _flat(vs).items():
        np.testing.assert_array_equal(a, _flat(again)[k], err_msg=k)
    p = to_unscanned(vs["params"], groups)
    assert set(p) == set(v["params"])
    # the stacked leaf i is block i + 1
    g, blocks = next(iter(groups.items()))
    leaf = next(iter(_flat(to_scanned(v, groups)["params"][g]).items()))
    for i, b in enumerate(blocks):
        np.testing.assert_array_equal(leaf[1][i], _flat(v["params"][b])[leaf[0]])


def test_layout_errors_name_the_group():
    plain, scanned = _models("resnet50")
    groups = scanned.scan_groups()  # layer1 has 3 blocks: ("layer1_block1", "layer1_block2") stacked
    p = _random_variables(plain)["params"]
    del p["layer1_block2"]
    with pytest.raises(ValueError, match="layer1_blocks.*layer1_block2"):
        stack_blocks(p, groups)
    wrong = to_scanned(_random_variables(plain)["params"], groups)
    wrong["layer1_blocks"] = jax.tree.map(lambda a: a[:1], wrong["layer1_blocks"])
    with pytest.raises(ValueError, match="leading axis"):
        unstack_blocks(wrong, groups)
    assert groups_of(plain) == {}
    assert groups_of(scanned) == groups


@pytest.mark.parametrize("arch", RUN_ARCHS)
def test_same_logits_eval_and_train(arch):
    # stochastic depth off: its masks are drawn from other keys when scanned (see the next tests);
    # the head's dropout (EfficientNet 0.2) is on and draws the same mask in both layouts.
    kw = {"stochastic_depth": 0.0} if arch.startswith("efficientnet") else {}
    plain, scanned = _models(arch, **kw)
    groups = scanned.scan_groups()
    v = _init(plain)
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.1 * jnp.abs(a), v["batch_stats"])}
    vs = to_scanned(v, groups)
    x = _images()
    np.testing.assert_allclose(_apply(plain)(v, x), _apply(scanned)(vs, x), **TOL)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    h = _stage_input(plain, arch)
    kw = dict(train=True, start=START[arch], mutable=["batch_stats"])
    y, up = _apply(plain, **kw)(v, h, rngs)
    ys, ups = _apply(scanned, **kw)(vs, h, rngs)
    np.testing.assert_allclose(y, ys, **TOL)
    _assert_trees_close(up["batch_stats"], unstack_blocks(ups["batch_stats"], groups), **TOL)


@pytest.mark.parametrize("arch", RUN_ARCHS)
def test_same_gradients_in_training(arch):
    """BatchNorm in train mode, head dropout on (same mask in both layouts), stochastic depth off."""
    train = True
    kw = {"stochastic_depth": 0.0} if arch.startswith("efficientnet") else {}
    plain, scanned = _models(arch, **kw)
    groups = scanned.scan_groups()
    v = _init(plain)
    x = _stage_input(plain, arch)
    target = jnp.array([0, 1, 1, 0])

    def loss(model, params, batch_stats):
        out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=train, start=START[arch],
                          mutable=["batch_stats"] if train else False, rngs={"dropout": jax.random.PRNGKey(2)})
        logits = out[0] if train else out
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), target])

    g = jax.jit(jax.grad(lambda p: loss(plain, p, v["batch_stats"])))(v["params"])
    vs = to_scanned(v, groups)
    gs = jax.jit(jax.grad(lambda p: loss(scanned, p, vs["batch_stats"])))(vs["params"])
    gs = unstack_blocks(gs, groups)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g))
    _assert_trees_close(g, gs, rtol=1e-4, atol=1e-5 * scale)
    # and through the conversion (how the trainer differentiates: state in the unscanned layout)
    gt = jax.jit(jax.grad(lambda p: loss(scanned, to_scanned(p, groups), vs["batch_stats"])))(v["params"])
    _assert_trees_close(g, gt, rtol=1e-4, atol=1e-5 * scale)


def test_traced_stochastic_depth_keeps_the_rate_and_rescales():
    y = jnp.ones((4000, 1, 1, 2), jnp.float32)
    out = _traced_stochastic_depth(y, jnp.float32(0.3), jax.random.PRNGKey(0))
    kept = np.asarray(out[:, 0, 0, 0]) > 0
    assert abs(kept.mean() - 0.7) < 0.03
    np.testing.assert_allclose(np.asarray(out[kept]), 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[:, :, :, 0]), np.asarray(out[:, :, :, 1]))  # per sample
    np.testing.assert_array_equal(_traced_stochastic_depth(y, jnp.float32(0.0), jax.random.PRNGKey(1)), y)


def _stage6_masks(model, variables, seed, n=256):
    """EfficientNet-B0's stage 6 (4 blocks) in training with every block's residual branch made a
    constant: project_bn scale 0, bias 2**(b-1) * keep_b for block b >= 1 (0 for block 0, which has
    no residual). Stochastic depth then adds 2**(b-1) exactly when block b keeps a sample, so the
    stage's output is each sample's keep bitmask. Returns (n, 3) bool: sample i kept by block b."""
    p = jax.tree.map(np.array, variables["params"])
    keep = [1 - 0.5 * (12 + b) / 16 for b in range(3)]  # stochastic_depth 0.5, blocks 12..14 of 16
    p["stage6_block0"]["project_bn"]["scale"][:] = 0
    p["stage6_block0"]["project_bn"]["bias"][:] = 0
    for b in range(3):
        if "stage6_blocks" in p:
            bn = p["stage6_blocks"]["project_bn"]
            bn["scale"][b], bn["bias"][b] = 0, 2 ** b * keep[b]
        else:
            bn = p[f"stage6_block{b + 1}"]["project_bn"]
            bn["scale"][:], bn["bias"][:] = 0, 2 ** b * keep[b]
    h = jnp.zeros((n, 2, 2, 112), jnp.float32)  # stage 5's output at 32 px
    out, _ = _apply(model, train=True, start="stage5", stop="stage6", mutable=["batch_stats"])(
        {"params": p, "batch_stats": variables["batch_stats"]}, h, {"dropout": jax.random.PRNGKey(seed)})
    bits = np.rint(np.asarray(out[:, 0, 0, 0])).astype(int)
    assert set(bits) <= set(range(8))
    return np.stack([(bits >> b) & 1 for b in range(3)], axis=1).astype(bool), np.array(keep)


def test_scanned_stochastic_depth_rates_and_independent_draws():
    """Stochastic depth in the scanned blocks keeps each sample with the block's own rate (the
    rates rise block by block as in the unscanned model), draws each block's mask independently
    (the 'dropout' stream is split over the scan) and is a function of the 'dropout' key. The draws
    themselves differ from the unscanned model's (other keys): documented, not compared."""
    plain, scanned = _models("efficientnet_b0", stochastic_depth=0.5, dropout=0.0)
    v = _init(plain)
    vs = to_scanned(v, scanned.scan_groups())
    for model, variables in ((plain, v), (scanned, vs)):
        masks, keep = _stage6_masks(model, variables, 0)
        np.testing.assert_allclose(masks.mean(0), keep, atol=0.1)  # n = 256: 3 standard deviations
        for i in range(3):
            for j in range(i):
                assert (masks[:, i] != masks[:, j]).any(), (i, j)
    a, _ = _stage6_masks(scanned, vs, 0)
    b, _ = _stage6_masks(scanned, vs, 0)
    c, _ = _stage6_masks(scanned, vs, 1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_trainer_option_exports_the_unscanned_layout(tmp_path, capsys):
    """A short run with model.scan_blocks: WORKDIR/best holds the usual layout and metadata (no
    scan_blocks), loads with `checkpoint.load_model` and predicts what the trained state predicts
    through the scanned step; resuming the run with the option off continues from its checkpoint."""
    import orbax.checkpoint as ocp

    from mskjax import checkpoint
    from mskjax.train import classifier as train
    from mskjax.train.config import load_config, validate

    c = load_config(Path(__file__).parent / "train" / "tiny_config.py")
    c.data.root = str(tmp_path / "data")
    c.train.epochs = 1
    c.model.scan_blocks = True
    c.eval.localization = False
    c.checkpoint.async_writes = False
    validate(c, 1)
    wd = tmp_path / "run"
    result = train.train_and_evaluate(c, wd)
    steps = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    model, variables, meta = checkpoint.load_model(wd / "best")
    assert "scan_blocks" not in meta["variant"] and not model.scan_blocks
    assert "layer1_block1" in variables["params"] and "layer1_blocks" not in variables["params"]

    # the run checkpoint of the best step: the trained state, in the unscanned layout too
    path = (wd / "checkpoints" / str(result["best_step"]) / "state").absolute()
    ckptr = ocp.StandardCheckpointer()
    meta_tree = ckptr.metadata(path)
    meta_tree = getattr(meta_tree, "item_metadata", meta_tree)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ckptr.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                             meta_tree))
    assert "layer1_block1" in state["params"]
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, SIDE, SIDE, 1))
    norm = train.normalization(c)
    scanned_eval = jax.jit(train.make_eval_step(train.step_model(c), c, norm))
    plain_eval = jax.jit(train.make_eval_step(model, c, norm))
    trained = {"params": state["params"], "batch_stats": state["batch_stats"]}
    np.testing.assert_allclose(plain_eval(jax.tree.map(jnp.asarray, variables), x), scanned_eval(trained, x), **TOL)
    _assert_trees_close(variables, trained, rtol=0, atol=0)

    # resume with the option off: the same state layout, so the run continues from its checkpoint
    c.model.scan_blocks = False
    c.train.epochs = 2
    train.train_and_evaluate(c, wd)
    assert f"resumed from the checkpoint at step {steps}" in capsys.readouterr().out
    assert (wd / "checkpoints" / str(2 * steps)).is_dir()
