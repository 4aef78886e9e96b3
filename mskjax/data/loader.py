"""Records -> fixed-size batches on the host (or sharded on devices), per process, with prefetch.

Order and sharding
------------------
Epoch e visits the records in the order ``np.random.default_rng([seed, e]).permutation(N)``
(``arange(N)`` with ``shuffle=False``). Global batch b is the positions ``[b*G, (b+1)*G)`` of that
order. Process p of P reads only rows ``p::P`` of each global batch (``G / P`` rows, its *local*
batch), so the set of records in a global batch does not depend on the process count. With a
`sharding`, the local rows become this process's part of a global ``jax.Array`` via
``jax.make_array_from_process_local_data``; rows then sit where this process's devices sit (row
order inside the global array differs from the logical order above; use "index" to tell which
record is where).

Batches
-------
Iterating yields dicts. Device keys (`DEVICE_KEYS`; jax.Arrays with a global leading axis G when
`sharding` is given, else numpy arrays with the local leading axis L = G / P):

* "image": (B, S, S, C) float32 in [0, 1] (or uint8 0..255 with ``image_dtype="uint8"``, 4x less to
  transfer). Normalisation and augmentation happen later, on the device.
* "label": (B,) int32.
* "valid": (B,) bool. False for padding rows: the last batch of an epoch with
  ``drop_remainder=False``, and records that failed to decode in "mask" mode (below).
* "index": (B,) int32 index into `records`; -1 for padding rows.

Host keys (`HOST_KEYS`; always numpy, always this process's local rows in local order, never
sharded; drop them with `device_batch` before calling a jitted step):

* "original_hw": (L, 2) int32 (H0, W0) of each decoded image (displayed frame); (S, S) for padding.
* "geometry": `mskjax.geometry.Geometry` with (L,) float64 fields: original -> input frame, for
  `boxes_to_original` / `map_to_original`. Padding rows get the identity geometry of an S x S image.
* "local_index": (L,) int32, the local rows' "index" as numpy (for lookups on the host).

Preprocessing: `decode_image` -> `preprocess(size=S, mode)` -> rounded to uint8 (x * 255). The
8-bit rounding happens whether or not `cache` is on, so cached and uncached runs give identical
batches; it costs at most 1/510 of intensity per pixel (16-bit sources lose their extra precision
at this stage, after the antialiased resize). The cache keeps one (S, S) uint8 array per record
(50 KB at 224 px: FracAtlas ~200 MB, MURA ~2 GB).

Bad files
---------
A record whose file fails to decode (`decode_image` raises `ImageDecodeError` or an OSError such as
FileNotFoundError) is skipped, remembered (not retried), logged, and reported in `skipped` /
`skip_report`. Its row is then handled per ``bad_records``:

* "fill" (default with ``drop_remainder=True``, i.e. training): the row takes the next good record in
  the epoch order (positions i+1, i+2, ..., wrapping around). That record appears twice in the
  epoch. The replacement depends only on the position and on which files are bad, never on
  threads, process count or where a run resumed, so every batch stays identical under all three.
* "mask" (default with ``drop_remainder=False``, i.e. evaluation): the row becomes padding
  (valid=False, index=-1), so evaluation sees every good image exactly once and none twice.

State
-----
``state()`` is the position of the next batch to be yielded: ``{"epoch", "step", "seed",
"num_records", "global_batch_size"}`` (JSON-able). ``Loader(..., state=s)`` or ``restore(s)`` resumes
there; the last two fields guard against resuming over a different dataset or batch size (a
mismatch raises). The process count may change between runs.

Threads
-------
``workers`` threads decode (Pillow releases the GIL while decoding and resizing) up to
``prefetch`` batches ahead of the one being consumed. Output order is fixed by positions, never by
thread timing. ``workers=0`` decodes synchronously. One iteration is active at a time: calling
``iter()`` again (or ``restore``) ends the previous iterator.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import jax
import numpy as np

from mskjax.data.images import ImageDecodeError, decode_image
from mskjax.data.preprocess import MODES, preprocess
from mskjax.data.records import SkipReport
from mskjax.geometry import Geometry

__all__ = ["Loader", "DEVICE_KEYS", "HOST_KEYS", "device_batch", "epoch_order"]

log = logging.getLogger(__name__)

DEVICE_KEYS = ("image", "label", "valid", "index")
HOST_KEYS = ("original_hw", "geometry", "local_index")
_STATE_KEYS = ("epoch", "step", "seed", "num_records", "global_batch_size")


def device_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The device keys of a loader batch ("image", "label", "valid", "index"), host keys dropped."""
    return {k: batch[k] for k in DEVICE_KEYS}


def epoch_order(num_records: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Record indices (N,) int64 in the order epoch `epoch` visits them."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_records)


class _Item:
    """One preprocessed record: uint8 (S, S) image, (H0, W0), and geometry data fields."""

    __slots__ = ("image", "original_hw", "geom")

    def __init__(self, image: np.ndarray, original_hw: tuple[int, int], geom: tuple[float, ...]):
        self.image = image
        self.original_hw = original_hw
        self.geom = geom


class Loader:
    """Batches of preprocessed radiographs for one process; see the module docstring.

    Args:
      records: sequence of objects with `.path` (str) and `.label` (0/1), e.g. `Record`s.
      global_batch_size: G, rows per step over all processes; a multiple of the process count.
      image_size: S, side of the square inputs.
      mode: "resize" or "letterbox" (see `preprocess`).
      channels: 1, or 3 (gray repeated).
      shuffle, seed: per-epoch permutation from (seed, epoch).
      num_epochs: stop after this many epochs (counted from epoch 0, so a resumed loader stops at
        the same place); None = forever.
      drop_remainder: True: N // G steps per epoch, every row a real record. False: ceil(N / G),
        the last batch padded (valid=False).
      process_index, process_count: this process's shard; None = jax.process_index()/count().
      sharding: a `jax.sharding.NamedSharding` partitioning the leading (batch) axis; None = numpy.
      prefetch: batches decoded ahead of the one being consumed.
      workers: decode threads (0 = decode in the consuming thread).
      cache: keep preprocessed uint8 images in host memory after the first decode.
      state: a `state()` dict to resume from.
      bad_records: "fill" or "mask" (see module docstring); None = "fill" if drop_remainder
        else "mask".
      image_dtype: "float32" ([0, 1]) or "uint8" ([0, 255]).
    """

    DEVICE_KEYS = DEVICE_KEYS
    HOST_KEYS = HOST_KEYS

    def __init__(
        self,
        records: Sequence[Any],
        *,
        global_batch_size: int,
        image_size: int,
        mode: str = "resize",
        channels: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        sharding: jax.sharding.Sharding | None = None,
        prefetch: int = 2,
        workers: int = 2,
        cache: bool = True,
        state: Mapping[str, int] | None = None,
        bad_records: str | None = None,
        image_dtype: str = "float32",
    ):
        self._paths = [str(r.path) for r in records]
        labels = [r.label for r in records]
        if not self._paths:
            raise ValueError("Loader needs at least one record")
        for path, label in zip(self._paths, labels):
            if label not in (0, 1):
                raise ValueError(f"record {path!r}: label must be 0 or 1, got {label!r}")
        self._labels = np.asarray(labels, dtype=np.int32)
        self.num_records = len(self._paths)

        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count})")
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size < 1 or self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"the process count {self.process_count}")
        self.local_batch_size = self.global_batch_size // self.process_count
        self.drop_remainder = bool(drop_remainder)
        if self.drop_remainder:
            self.steps_per_epoch = self.num_records // self.global_batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"{self.num_records} records make no full batch of {self.global_batch_size} "
                                 "(use drop_remainder=False or a smaller batch)")
        else:
            self.steps_per_epoch = math.ceil(self.num_records / self.global_batch_size)

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels!r}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be positive; got {image_size}")
        if image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8'; got {image_dtype!r}")
        if bad_records is None:
            bad_records = "fill" if self.drop_remainder else "mask"
        if bad_records not in ("fill", "mask"):
            raise ValueError(f"bad_records must be 'fill' or 'mask'; got {bad_records!r}")
        if num_epochs is not None and int(num_epochs) < 0:
            raise ValueError(f"num_epochs must be >= 0 or None; got {num_epochs}")
        if int(prefetch) < 0 or int(workers) < 0:
            raise ValueError(f"prefetch and workers must be >= 0; got {prefetch}, {workers}")
        if sharding is not None and (self.process_index, self.process_count) != (
                jax.process_index(), jax.process_count()):
            raise ValueError("a sharding needs the real process_index/process_count "
                             f"({jax.process_index()}/{jax.process_count()}); got "
                             f"{self.process_index}/{self.process_count}")
        self.image_size = int(image_size)
        self.mode = mode
        self.channels = int(channels)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_epochs = None if num_epochs is None else int(num_epochs)
        self.sharding = sharding
        self.prefetch = int(prefetch)
        self.workers = int(workers)
        self.cache = bool(cache)
        self.bad_records = bad_records
        self.image_dtype = image_dtype

        self._cache: dict[int, _Item] = {}
        self._bad: dict[int, str] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}
        self._generation = 0
        self._epoch = 0
        self._step = 0
        # Rows of a global batch this process owns: p, p + P, ... (L of them).
        self._local_rows = np.arange(self.process_index, self.global_batch_size, self.process_count)
        if state is not None:
            self.restore(state)

    # ---------------------------------------------------------------------------------------
    # Public API.

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state(self) -> dict[str, int]:
        """Position of the next batch `__next__` will yield, JSON-able."""
        return {"epoch": self._epoch, "step": self._step, "seed": self.seed,
                "num_records": self.num_records, "global_batch_size": self.global_batch_size}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a `state()` dict; ends any running iterator."""
        missing = [k for k in ("epoch", "step", "seed") if k not in state]
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"loader state must have keys {_STATE_KEYS}; missing {missing}, unknown {unknown}")
        for key, mine in (("seed", self.seed), ("num_records", self.num_records),
                          ("global_batch_size", self.global_batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]} but this loader has "
                                 f"{key}={mine}; resuming would not reproduce the saved run")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"loader state epoch={epoch} step={step} is outside epochs >= 0 and "
                             f"steps [0, {self.steps_per_epoch})")
        self._generation += 1
        self._epoch, self._step = epoch, step

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every record that failed to decode so far, in record order."""
        with self._lock:
            bad = sorted(self._bad.items())
        return [(self._paths[i], reason) for i, reason in bad]

    @property
    def skip_report(self) -> SkipReport:
        """`skipped` as a `SkipReport` (kind "missing_file" or "undecodable")."""
        report = SkipReport()
        for path, reason in self.skipped:
            report.add(path, "missing_file" if reason.startswith("FileNotFoundError") else "undecodable", reason)
        return report

    def close(self) -> None:
        """Stop the decode threads (pending decodes are cancelled). The loader can be iterated again."""
        self._generation += 1
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._iterate(self._generation)

    # ---------------------------------------------------------------------------------------
    # Iteration.

    def _finished(self, epoch: int) -> bool:
        return self.num_epochs is not None and epoch >= self.num_epochs

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(self.num_records, self.seed, epoch, self.shuffle)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def _iterate(self, generation: int) -> Iterator[dict[str, Any]]:
        pending: collections.deque = collections.deque()
        epoch, step = self._epoch, self._step  # next batch to schedule
        while True:
            while len(pending) < self.prefetch + 1 and not self._finished(epoch):
                pending.append((epoch, step, self._schedule(epoch, step)))
                step += 1
                if step == self.steps_per_epoch:
                    epoch, step = epoch + 1, 0
            if not pending:
                return
            b_epoch, b_step, rows = pending.popleft()
            self._check_current(generation)
            batch = self._assemble(b_epoch, b_step, rows)
            self._check_current(generation)
            self._epoch, self._step = b_epoch, b_step + 1
            if self._step == self.steps_per_epoch:
                self._epoch, self._step = b_epoch + 1, 0
            yield batch

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("this loader iterator was superseded by a newer iter(), restore() or close()")

    def _positions(self, step: int) -> np.ndarray:
        """Epoch-order positions of this process's rows of global batch `step` (may exceed N-1)."""
        return step * self.global_batch_size + self._local_rows

    def _schedule(self, epoch: int, step: int) -> list:
        """Start decoding this process's rows of (epoch, step); one entry per row."""
        order = self._order(epoch)
        rows = []
        for pos in self._positions(step):
            if pos >= self.num_records:
                rows.append(None)  # padding past the end of the epoch
                continue
            idx = int(order[pos])
            if idx in self._cache or idx in self._bad or self.workers == 0:
                rows.append(idx)  # resolved (or decoded) when the batch is assembled
            else:
                rows.append(self._pool().submit(self._load, idx))
        return rows

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="mskjax-loader")
        return self._executor

    def _load(self, idx: int) -> _Item | None:
        """Decode + preprocess record `idx` (cached); None if its file cannot be decoded."""
        item = self._cache.get(idx)
        if item is not None:
            return item
        if idx in self._bad:
            return None
        path = self._paths[idx]
        try:
            decoded = decode_image(path)
            image, geom = preprocess(decoded.image, self.image_size, self.mode, channels=1)
        except (ImageDecodeError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
            with self._lock:
                first = idx not in self._bad
                self._bad[idx] = reason
            if first:
                log.warning("skipping record %d: %s", idx, reason)
            return None
        item = _Item(np.round(image[..., 0] * 255.0).astype(np.uint8),
                     (decoded.image.shape[0], decoded.image.shape[1]), tuple(geom._data()))
        if self.cache:
            self._cache[idx] = item
        return item

    def _resolve(self, row) -> _Item | None:
        if isinstance(row, Future):
            return row.result()
        return self._load(row)

    def _replacement(self, epoch: int, pos: int) -> tuple[int, _Item]:
        """The next good record after epoch position `pos` (wrapping): "fill" mode."""
        order = self._order(epoch)
        for k in range(1, self.num_records):
            idx = int(order[(pos + k) % self.num_records])
            item = self._load(idx)
            if item is not None:
                return idx, item
        raise ValueError(f"none of the {self.num_records} records could be decoded:\n"
                         + self.skip_report.summary())

    def _assemble(self, epoch: int, step: int, rows: list) -> dict[str, Any]:
        s, n_local = self.image_size, self.local_batch_size
        images = np.zeros((n_local, s, s), np.uint8)
        labels = np.zeros((n_local,), np.int32)
        valid = np.zeros((n_local,), bool)
        index = np.full((n_local,), -1, np.int32)
        original_hw = np.full((n_local, 2), s, np.int32)
        geom = np.zeros((6, n_local), np.float64)
        geom[:2] = 1.0  # identity scales for padding rows
        geom[4:] = s
        positions = self._positions(step)
        for r, (pos, row) in enumerate(zip(positions, rows)):
            if row is None:
                continue
            item = self._resolve(row)
            idx = int(self._order(epoch)[pos])
            if item is None:
                if self.bad_records == "mask":
                    continue
                idx, item = self._replacement(epoch, int(pos))
            images[r] = item.image
            labels[r] = self._labels[idx]
            valid[r] = True
            index[r] = idx
            original_hw[r] = item.original_hw
            geom[:, r] = item.geom
        if self.image_dtype == "uint8":
            image = images[..., None]
        else:
            image = images[..., None].astype(np.float32) / np.float32(255.0)
        if self.channels != 1:
            image = np.repeat(image, self.channels, axis=-1)
        batch = {"image": image, "label": labels, "valid": valid, "index": index}
        if self.sharding is not None:
            batch = {k: self._to_global(v) for k, v in batch.items()}
        batch["original_hw"] = original_hw
        batch["geometry"] = Geometry(*geom, input_h=s, input_w=s)
        batch["local_index"] = index.copy()
        return batch

    def _to_global(self, local: np.ndarray) -> jax.Array:
        shape = (self.global_batch_size,) + local.shape[1:]
        return jax.make_array_from_process_local_data(self.sharding, local, shape)
