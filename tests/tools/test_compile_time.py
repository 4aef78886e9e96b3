"""tools/compile_time.py's pieces that are not timing: the ravelled optimizer its "ravel" variant
compiles (it must take the trainer's optimizer step, or the comparison means nothing) and the
compiler-option parser."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax.train import optim

_spec = importlib.util.spec_from_file_location("compile_time", Path(__file__).parents[2] / "tools" / "compile_time.py")
compile_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_time)


def _params(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4))},
            "bn": {"scale": 1.0 + 0.1 * jax.random.normal(k[1], (4,)), "bias": jax.random.normal(k[2], (4,))},
            "head": {"kernel": jax.random.normal(k[3], (4, 3))}}


def test_groups_round_trip():
    p = _params(0)
    marks = jax.tree.leaves(optim.decay_mask(p))
    g = compile_time.to_groups(p, marks)
    assert g["decay"].shape == (72 + 12,) and g["no_decay"].shape == (8,)
    jax.tree.map(np.testing.assert_array_equal, compile_time.from_groups(g, p, marks), p)


def test_ravelled_sgd_takes_the_trainers_step():
    """Five steps with weight decay and clipping active: the same parameters as
    make_optimizer("sgd") leaf by leaf, to float rounding, through optim.apply_gradients."""
    lr = optim.schedule(0.05, 100, 2)
    leafwise = optim.make_optimizer("sgd", lr, 1e-2, 0.9, grad_clip=1.0)
    flat = compile_time.ravelled_sgd(lr, 1e-2, 0.9, 1.0)
    p1 = p2 = _params(0)
    s1, s2 = leafwise.init(p1), flat.init(p2)
    for i in range(5):
        grads = jax.tree.map(lambda x: 3.0 * x, _params(10 + i))
        p1, s1, n1 = optim.apply_gradients(leafwise, grads, s1, p1)
        p2, s2, n2 = optim.apply_gradients(flat, grads, s2, p2)
        assert float(n1) > 1.0  # clipping is active
        np.testing.assert_allclose(float(n2), float(n1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert {leaf.ndim for leaf in jax.tree.leaves(s2) if jnp.size(leaf) > 1} == {1}


def test_option_sets_parse_and_reject_malformed():
    assert compile_time.parse_option_sets("base:;o1:xla_backend_optimization_level=1,xla_llvm_disable_expensive_passes=true") == [
        ("base", {}), ("o1", {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True})]
    from mskjax.passes import CPU_CLASSIFIER_OPTIONS, CPU_ENCODER_OPTIONS
    assert compile_time.parse_option_sets("ynnpack:;eigen:@classifier;enc:@encoder") == [
        ("ynnpack", {}), ("eigen", CPU_CLASSIFIER_OPTIONS), ("enc", CPU_ENCODER_OPTIONS)]
    for bad in ("noname", ":x=1", "a:flag", "a:@nothing"):
        with pytest.raises(ValueError):
            compile_time.parse_option_sets(bad)


def test_sam_train_and_pipeline_workers_compile_their_steps():
    """The `--sam-train` and `--pipeline` cells compile what they name (tiny sizes here): the SAM
    trainer's step with the image encoder and decoder trained plus its predict step; the
    pipeline's encoder and its step, each with a lower and a compile time and XLA:CPU kernels."""
    sam = compile_time.sam_train_worker("sam_vit_tiny", 64, 1)
    assert set(sam["parts"]) >= {"image_encoder", "mask_decoder"}
    pipe = compile_time.pipeline_worker("resnet18@64+sam_vit_tiny@64", 1)
    for cell in (sam["train"], sam["eval"], pipe["embed"], pipe["step"]):
        assert cell["lower_s"] > 0 and cell["compile_s"] > 0 and cell["stablehlo_lines"] > 0
        assert cell["kernels"] is None or cell["kernels"] > 0
    # the train step differentiates the encoder: far more kernels than its forward-only predict step
    assert sam["train"]["kernels"] > 2 * sam["eval"]["kernels"]
