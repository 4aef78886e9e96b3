"""Where SAM ViT-B's image encoder spends its time on this CPU, beside segment_anything (issue 21, part 2).

Builds segment_anything's vit_b image encoder at `--size` px with random weights, converts them
to mskjax's layout (`mskjax.weights.sam`), and times, in one process, round-robin (one call of
each per round after a warm-up; median over rounds), batch 1:

* the whole encoder;
* one windowed block (blocks_0) and one global block (blocks_2) on the (1, g, g, 768) token grid;
* inside them: the attention (with window partition for the windowed block) and the MLP.

mskjax runs under jax.jit; torch under no_grad on `--threads` threads. Each mskjax piece is also
checked against torch's output (max abs difference printed). Then, for the attention alone, the
variants in `ATTENTION_VARIANTS` (same weights) are timed the same way and checked against the
current one; and the whole encoder now against the one before 2026-12-07 (padded windows
projected, relative terms added as two broadcast passes; `encoder_before_and_after`). JSON out.
`--encoder-options` compiles every mskjax piece with `mskjax.passes.encoder_compiler_options()`
(what `Pipeline` compiles the encoder with); by default XLA's own options.

    .venv/bin/python tools/profile_sam_encoder.py --size 512 --rounds 5 [--encoder-options] --out docs/x.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax.models.sam.common import ENCODER_LN_EPS, MLPBlock, layer_norm  # noqa: E402
from mskjax.models.sam.image_encoder import (EncoderAttention, EncoderBlock, ImageEncoderViT,  # noqa: E402
                                             get_rel_pos, window_partition, window_unpartition)
from mskjax.weights.sam import sam_variables_from_state_dict  # noqa: E402


def attention_bias_sdpa(params, x, num_heads):
    """The same attention through jax.nn.dot_product_attention with the relative positions as an
    additive bias (B, N, Q, K)."""
    b, h, w, c = x.shape
    hd = c // num_heads
    qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(b, h * w, 3, num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    r_h = get_rel_pos(h, h, params["rel_pos_h"])
    r_w = get_rel_pos(w, w, params["rel_pos_w"])
    rq = q.reshape(b, h, w, num_heads, hd)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", rq, r_h)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", rq, r_w)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, num_heads, h * w, h * w)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
    return out.reshape(b, h, w, c) @ params["proj"]["kernel"] + params["proj"]["bias"]


def attention_einsum_layout(params, x, num_heads):
    """EncoderAttention as it was before 2026-12-06: einsums over q, k, v in the (B, T, N, D)
    layout the qkv projection gives (what the current module replaced)."""
    b, h, w, c = x.shape
    hd = c // num_heads
    qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(b, h * w, 3, num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, t, n, d)
    attn = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k)
    r_h = get_rel_pos(h, h, params["rel_pos_h"])
    r_w = get_rel_pos(w, w, params["rel_pos_w"])
    rq = q.reshape(b, h, w, num_heads, hd)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", rq, r_h)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", rq, r_w)
    attn = (attn.reshape(b, num_heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :])
    attn = jax.nn.softmax(attn.reshape(b, num_heads, h * w, h * w), axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(b, h, w, c)
    return out @ params["proj"]["kernel"] + params["proj"]["bias"]


def attention_broadcast_relative(params, x, num_heads):
    """EncoderAttention as it was from 2026-12-06 to 2026-12-07: heads first, the two relative terms
    added to the (n, n) logits as broadcasts (segment_anything's order) instead of inside the matmul."""
    b, h, w, c = x.shape
    hd = c // num_heads
    qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(b, h * w, 3, num_heads, hd)
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (hd ** -0.5)) @ k.swapaxes(-1, -2)
    r_h = get_rel_pos(h, h, params["rel_pos_h"])
    r_w = get_rel_pos(w, w, params["rel_pos_w"])
    rq = q.reshape(b, num_heads, h, w, hd)
    rel_h = jnp.einsum("bnyxd,ykd->bnyxk", rq, r_h)
    rel_w = jnp.einsum("bnyxd,xkd->bnyxk", rq, r_w)
    attn = attn.reshape(b, num_heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    attn = jax.nn.softmax(attn.reshape(b, num_heads, h * w, h * w), axis=-1)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, h, w, c)
    return out @ params["proj"]["kernel"] + params["proj"]["bias"]


ATTENTION_VARIANTS = {"dot_product_attention (bias)": attention_bias_sdpa,
                      "einsum layout (the module before 2026-12-06)": attention_einsum_layout,
                      "relative terms as broadcasts (before 2026-12-07)": attention_broadcast_relative}


def rounds(fns: dict, n: int) -> dict:
    """{name: median seconds} over n round-robin rounds, one call of each per round."""
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def encoder_before_and_after(size: int, rounds_n: int, options: dict) -> dict:
    """The whole encoder now and as it was before 2026-12-07 (every windowed block's padded tokens
    projected, and the relative terms added as broadcasts: `attention_broadcast_relative` over the
    padded windows swapped in), same weights, interleaved in one process: batch 1 through
    `Sam.image_encoder` (`mskjax.sam.embed(images_per_pass=0)`), and 2 images one at a time
    (`images_per_pass=1`, the pipeline's default on one CPU device). Median s per image."""
    from mskjax import sam as samfn
    from mskjax.models.sam import image_encoder as ie
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    model = build_sam("vit_b", img_size=size)
    variables = init_sam_variables(model, jax.random.PRNGKey(0))
    rs = np.random.RandomState(1)  # non-zero relative-position tables
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.02 * rs.randn(*a.shape).astype(np.float32)
        if "rel_pos" in jax.tree_util.keystr(path) else a, variables)
    x1 = jnp.asarray(np.random.RandomState(0).randn(1, size, size, 3).astype(np.float32))
    x2 = jnp.asarray(np.random.RandomState(2).randn(2, size, size, 3).astype(np.float32))
    current = ie.EncoderAttention.__call__

    def before(self, x):
        params = self.variables["params"]
        if self.window == 0:
            return attention_broadcast_relative(params, x, self.num_heads)
        windows, padded = window_partition(x, self.window)
        out = attention_broadcast_relative(params, windows, self.num_heads)
        return window_unpartition(out, self.window, padded, (x.shape[1], x.shape[2]))

    fns, outs = {}, {}
    try:
        for name, call in (("now", current), ("before", before)):
            ie.EncoderAttention.__call__ = call  # traced (and compiled) now, under this attention
            f1 = jax.jit(lambda v, x: samfn.embed(model, v, x, images_per_pass=0), compiler_options=options)
            f2 = jax.jit(lambda v, x: samfn.embed(model, v, x, images_per_pass=1), compiler_options=options)
            outs[name] = (np.asarray(f1(variables, x1)), np.asarray(f2(variables, x2)))
            fns[f"{name}, batch 1"] = partial(lambda f: f(variables, x1).block_until_ready(), f1)
            fns[f"{name}, 2 images one at a time"] = partial(lambda f: f(variables, x2).block_until_ready(), f2)
    finally:
        ie.EncoderAttention.__call__ = current
    med = rounds(fns, rounds_n)
    per_image = {k: v / (2 if "2 images" in k else 1) for k, v in med.items()}
    return {"s_per_image": per_image,
            "speedup_batch_1": per_image["before, batch 1"] / per_image["now, batch 1"],
            "speedup_one_at_a_time": per_image["before, 2 images one at a time"]
            / per_image["now, 2 images one at a time"],
            "max_abs_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(outs["now"], outs["before"])))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder-options", action="store_true",
                    help="compile the mskjax pieces with mskjax.passes.encoder_compiler_options()")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch
    from segment_anything.modeling import ImageEncoderViT as TorchEncoder
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, g = args.size, args.size // 16
    tsam = Sam(  # segment_anything's vit_b as build_sam_vit_b wires it, at `size`
        image_encoder=TorchEncoder(depth=12, embed_dim=768, img_size=size, mlp_ratio=4,
                                   norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                                   qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11),
                                   window_size=14, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(g, g), input_image_size=(size, size),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256)).eval()
    tenc = tsam.image_encoder
    with torch.no_grad():  # random relative-position tables and pos_embed (zero at construction)
        for name, p in tenc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.02)
    sd = {k: v.numpy() for k, v in tsam.state_dict().items()}
    params = sam_variables_from_state_dict(sd, "vit_b", img_size=size)["params"]["image_encoder"]
    enc = ImageEncoderViT(img_size=size)
    rng = np.random.RandomState(0)
    image = rng.randn(1, size, size, 3).astype(np.float32)
    tokens = rng.randn(1, g, g, 768).astype(np.float32)
    timg = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()
    ttok = torch.from_numpy(tokens)
    jtok = jnp.asarray(tokens)

    from mskjax.passes import encoder_compiler_options
    options = encoder_compiler_options() if args.encoder_options else {}
    jit = partial(jax.jit, compiler_options=options)

    def win_attn(p, x):  # the module partitions the grid itself (window=14)
        return EncoderAttention(12, (14, 14), window=14).apply({"params": p}, x)

    def torch_win_attn(blk, x):
        from segment_anything.modeling.image_encoder import window_partition as tp, window_unpartition as tu
        w, pad = tp(x, 14)
        return tu(blk.attn(w), 14, pad, (g, g))

    b0, b2 = params["blocks_0"], params["blocks_2"]
    mlp = MLPBlock(3072, "gelu")
    jax_fns = {
        "whole encoder": (jit(lambda x: enc.apply({"params": params}, x)), jnp.asarray(image),
                          lambda: tenc(timg).permute(0, 2, 3, 1)),
        "windowed block": (jit(lambda x: EncoderBlock(12, 14, (g, g)).apply({"params": b0}, x)), jtok,
                           lambda: tenc.blocks[0](ttok)),
        "global block": (jit(lambda x: EncoderBlock(12, 0, (g, g)).apply({"params": b2}, x)), jtok,
                         lambda: tenc.blocks[2](ttok)),
        "windowed attention (with partition)": (jit(lambda x: win_attn(b0["attn"], x)), jtok,
                                                lambda: torch_win_attn(tenc.blocks[0], ttok)),
        "global attention": (jit(lambda x: EncoderAttention(12, (g, g)).apply({"params": b2["attn"]}, x)), jtok,
                             lambda: tenc.blocks[2].attn(ttok)),
        "MLP": (jit(lambda x: mlp.apply({"params": b0["mlp"]}, x)), jtok, lambda: tenc.blocks[0].mlp(ttok)),
        "LayerNorm": (jit(lambda x: layer_norm(ENCODER_LN_EPS).apply({"params": b0["norm1"]}, x)), jtok,
                      lambda: tenc.blocks[0].norm1(ttok)),
    }
    calls, diffs = {}, {}
    with torch.no_grad():
        for name, (f, x, tf) in jax_fns.items():
            out = np.asarray(f(x))
            ref = tf().numpy()
            diffs[name] = float(np.max(np.abs(out - ref)))
            calls[f"mskjax {name}"] = partial(lambda f, x: f(x).block_until_ready(), f, x)
            calls[f"torch {name}"] = tf
        # attention variants (global and windowed inputs) against the current module
        cur_g = np.asarray(jax_fns["global attention"][0](jtok))
        wins = window_partition(jtok, 14)[0]
        cur_w = np.asarray(jit(lambda x: EncoderAttention(12, (14, 14)).apply({"params": b0["attn"]}, x))(wins))
        cur_wfn = jit(lambda x: EncoderAttention(12, (14, 14)).apply({"params": b0["attn"]}, x))
        calls["mskjax windowed attention (no partition)"] = lambda: cur_wfn(wins).block_until_ready()
        for vname, fn in ATTENTION_VARIANTS.items():
            fg = jit(partial(fn, b2["attn"], num_heads=12))
            fw = jit(partial(fn, b0["attn"], num_heads=12))
            diffs[f"variant {vname}, global vs current"] = float(np.max(np.abs(np.asarray(fg(jtok)) - cur_g)))
            diffs[f"variant {vname}, windowed vs current"] = float(np.max(np.abs(np.asarray(fw(wins)) - cur_w)))
            calls[f"variant {vname}: global attention"] = partial(lambda f: f(jtok).block_until_ready(), fg)
            calls[f"variant {vname}: windowed attention (no partition)"] = partial(
                lambda f: f(wins).block_until_ready(), fw)
        for f in calls.values():  # warm-up (compiles)
            f()
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        t0 = time.time()
        med = rounds(calls, args.rounds)
    table = {}
    for name in jax_fns:
        j, t = med[f"mskjax {name}"], med[f"torch {name}"]
        table[name] = {"mskjax_ms": 1e3 * j, "torch_ms": 1e3 * t, "speed_vs_torch": t / j, "max_abs_diff": diffs[name]}
    variants = {k: {"ms": 1e3 * v} for k, v in med.items() if k.startswith("variant")}
    variants["current: global attention"] = {"ms": 1e3 * med["mskjax global attention"]}
    variants["current: windowed attention (no partition)"] = {"ms": 1e3 * med["mskjax windowed attention (no partition)"]}
    print(f"SAM vit_b image encoder @ {size} px, batch 1, median of {args.rounds} rounds "
          f"(load at start {' '.join(load0)}):")
    print(f"  {'piece':40s} {'mskjax ms':>10s} {'torch ms':>10s} {'ratio':>7s} {'max diff':>9s}")
    for k, v in table.items():
        print(f"  {k:40s} {v['mskjax_ms']:10.1f} {v['torch_ms']:10.1f} {v['speed_vs_torch']:6.2f}x {v['max_abs_diff']:9.1e}")
    print("  attention variants (same weights):")
    for k, v in sorted(variants.items()):
        print(f"  {k:60s} {v['ms']:8.1f} ms")
    for k, v in diffs.items():
        if k.startswith("variant"):
            print(f"  {k}: max abs diff {v:.1e}")
    ab = encoder_before_and_after(size, args.rounds, options)
    print("  whole encoder, now vs before 2026-12-07 (interleaved, s per image):")
    for k, v in ab["s_per_image"].items():
        print(f"    {k:40s} {v:.3f}")
    print(f"    speedup: batch 1 {ab['speedup_batch_1']:.2f}x, one at a time {ab['speedup_one_at_a_time']:.2f}x; "
          f"max abs diff {ab['max_abs_diff']:.1e}")
    out = {"size": size, "rounds": args.rounds, "compiler_options": options, "encoder_before_and_after": ab, "threads": args.threads, "load_at_start": load0,
           "seconds": round(time.time() - t0, 1), "machine": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "torch": torch.__version__,
           "pieces": table, "attention_variants": variants, "diffs": diffs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
