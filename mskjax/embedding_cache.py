"""Image embeddings of a frozen SAM / LiteMedSAM encoder kept on disk between runs.

With `train.cache_embeddings` the trainer embeds every image once per run; an encoder as heavy as
LiteMedSAM's TinyViT (a 64 x 64 token grid at 256 px: about 2.5 s per image on a 2-core CPU) makes
that the longest part of a short fine-tuning run, and of every pipeline run over a dataset.
`train.embedding_cache_dir` (the trainer) and `Pipeline(..., embedding_cache=DIR)` / `segment
--embedding-cache DIR` (the pipeline) keep them, with the same keys, so the two share a folder:

    DIR/<encoder fingerprint>/<input fingerprint>.npy    float32 (e, e, 256), one per image

- encoder fingerprint: SHA-256 over the arch, img_size, input recipe and every leaf (path, dtype,
  shape, bytes) of the encoder's parameters and BatchNorm statistics. Any change of weights, even
  one value, gives a new folder: a cache never serves another encoder's outputs.
- input fingerprint: SHA-256 of the uint8 canvas (S x S) and its resized (h, w): the exact input.

Files are written to a temporary name and renamed, so a killed run leaves no torn file; a file that
cannot be read or has the wrong shape is recomputed (and overwritten), never trusted.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

ENCODER_PARTS = ("image_encoder",)  # the top-level parameter / statistics groups that embed images


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (str(k),))
    else:
        yield prefix, np.asarray(tree)


def encoder_fingerprint(variables: dict, arch: str, img_size: int, preprocessing: str) -> str:
    """Hex SHA-256 of what decides an embedding besides the input: the encoder's variables (every
    collection's "image_encoder" subtree: params, batch_stats), arch, img_size and input recipe."""
    h = hashlib.sha256(f"{arch}|{int(img_size)}|{preprocessing}".encode())
    for collection in sorted(variables):
        part = variables[collection]
        for name in ENCODER_PARTS:
            if name in part:
                for path, leaf in _leaves(part[name], (collection, name)):
                    h.update("/".join(path).encode())
                    h.update(f"{leaf.dtype}{leaf.shape}".encode())
                    h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def input_fingerprint(canvas: np.ndarray, input_size) -> str:
    """Hex SHA-256 of one uint8 canvas (S, S) and its (h, w)."""
    canvas = np.ascontiguousarray(canvas)
    h = hashlib.sha256(f"{canvas.dtype}{canvas.shape}|{int(input_size[0])},{int(input_size[1])}".encode())
    h.update(canvas.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """One encoder's embeddings on disk: `get(canvas, size)` -> array or None, `put(...)`.

    directory: the cache root (train.embedding_cache_dir); the encoder's folder is created under
    it. shape: the (e, e, C) of one embedding, used to reject stale or torn files.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, shape: tuple[int, ...]):
        self.folder = Path(directory) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.hits = self.misses = 0

    def _path(self, canvas, size) -> Path:
        return self.folder / f"{input_fingerprint(canvas, size)}.npy"

    def get(self, canvas: np.ndarray, size) -> np.ndarray | None:
        path = self._path(canvas, size)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            self.misses += 1
            return None
        if arr.shape != self.shape or arr.dtype != np.float32:
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, canvas: np.ndarray, size, embedding: np.ndarray) -> None:
        embedding = np.asarray(embedding, np.float32)
        if embedding.shape != self.shape:
            raise ValueError(f"embedding shape {embedding.shape} is not the cache's {self.shape}")
        path = self._path(canvas, size)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, embedding, allow_pickle=False)
        os.replace(tmp, path)
