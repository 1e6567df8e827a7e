"""juicer for PyTorch trainers: the juicing dataloader of the Rust crate, as a ``torch.utils.data.IterableDataset``.

``Loader(sources, **options)`` reads WebDataset shards (local, HTTP, S3/GCS/Azure, gzip) or a folder + captions
JSONL, and yields juiced batches: the salient patches of every image, their grid positions, and the CLIP tokens
of the caption enriched with the classes the image shows. The work runs in juicer's own native threads (decode,
score, prune, extract, enrich, batch) with the GIL released; Python only receives finished batches, whose arrays
are the Rust buffers themselves (no copy).

Each batch is a dict:

- ``patches``: float32 ``[B, K, 3*P*P]``, the kept patches, zero-padded to the batch's largest kept count K;
- ``positions``: int64 ``[B, K]``, row-major grid index of each kept patch (0 for padding);
- ``patch_mask``: bool ``[B, K]``, True where ``patches`` holds a real patch;
- ``tokens``: int64 ``[B, 77]``, CLIP tokens of the enriched captions, zero-padded;
- ``token_mask``: bool ``[B, 77]``, True on real tokens;
- ``keys``, ``captions``, ``enriched`` (lists of str), ``classes`` and ``added`` (per sample, lists of
  ``{"name", "wnid", "id", "prob"}``), ``kept``, ``scores``, ``token_ids`` (per-sample lists), ``grid``,
  ``patch``.

Arrays are torch tensors when torch is installed (``torch.from_numpy``, sharing memory), numpy arrays otherwise
(``as_torch=False`` asks for numpy).

Use it directly, or through a ``DataLoader`` that adds nothing but pinning::

    loader = juicer.Loader("shards/train-{000000..000099}.tar", batch_size=64, seed=7)
    for batch in DataLoader(loader, batch_size=None, num_workers=0, pin_memory=True):
        ...

juicer parallelises itself: keep ``num_workers=0``. A forked DataLoader worker cannot run juicer's threads and
raises a ``RuntimeError`` saying so.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

# Without a desktop session, Mesa's device-select Vulkan layer makes libwayland print "error: XDG_RUNTIME_DIR is
# invalid or not set" when juicer probes for a GPU; its own switch turns it off (the crate's juicer::device docs,
# "Headless Vulkan"). Set before the extension loads, unless the user chose.
if not os.environ.get("XDG_RUNTIME_DIR"):
    os.environ.setdefault("NODEVICE_SELECT", "1")

from . import _juicer
from ._juicer import OPTIONS, JuicerError

try:  # torch is optional: without it, batches hold numpy arrays.
    import torch
    from torch.utils.data import IterableDataset as _Dataset
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    _Dataset = object

__all__ = ["Loader", "JuicerError", "OPTIONS", "juice", "__version__"]
__version__ = _juicer.__version__

_ARRAYS = ("patches", "positions", "patch_mask", "tokens", "token_mask")

Sources = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def _sources(sources: Sources) -> List[str]:
    if isinstance(sources, (str, os.PathLike)):
        return [os.fspath(sources)]
    return [os.fspath(s) for s in sources]


def _torch_world(options: Dict[str, Any]) -> Dict[str, Any]:
    """Rank and world size from ``torch.distributed`` when it is initialised and the caller gave neither.

    Otherwise the crate reads them from the environment: ``RANK``/``WORLD_SIZE`` (torchrun), then
    ``SLURM_PROCID``/``SLURM_NTASKS``, else a single process.
    """
    if torch is None or "rank" in options or "world_size" in options:
        return options
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dict(options, rank=dist.get_rank(), world_size=dist.get_world_size())
    return options


def _to_batch(raw: Any, as_torch: bool) -> Dict[str, Any]:
    """A core batch as the dict users see; the arrays are views of the Rust buffers."""
    arrays = raw.take_arrays()
    batch: Dict[str, Any] = {}
    for name, array in zip(_ARRAYS, arrays):
        view = np.asarray(array)
        batch[name] = torch.from_numpy(view) if as_torch else view
    batch.update(raw.lists())
    return batch


class _Epoch(Iterator[Dict[str, Any]]):
    """One epoch in progress; closing it (or dropping it) stops juicer's graph and joins its threads."""

    def __init__(self, core: Any, loader: "Loader", epoch: int) -> None:
        self._core = core
        self._loader = loader
        self.epoch = epoch

    def __iter__(self) -> "_Epoch":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._core is None:
            raise StopIteration
        try:
            raw = next(self._core)
        except StopIteration:
            self.close()
            raise
        return _to_batch(raw, self._loader._as_torch)

    def summary(self) -> Dict[str, Any]:
        """Counters of this epoch so far (read, emitted, dropped by reason, batches, patches, classes, ...)."""
        if self._core is None:
            return self._loader._last_summary or {}
        return json.loads(self._core.summary_json())

    def take_dropped(self) -> List[tuple]:
        """Samples dropped since the last call, as ``(key, reason, detail)``."""
        return [] if self._core is None else self._core.take_dropped()

    def close(self) -> None:
        """Stops the graph and joins its threads; the summary stays readable on the loader."""
        core, self._core = self._core, None
        if core is not None:
            self._loader._last_summary = json.loads(core.summary_json())
            core.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


class Loader(_Dataset):  # type: ignore[misc, valid-type]
    """The juicing loader over ``sources`` (paths, globs, brace ranges, URLs; see the crate's README).

    Options (keyword only; the names of ``juicer run``'s flags with ``_`` for ``-``, the crate's defaults):
    ``batch_size`` (32), ``seed`` (0), ``device`` ("auto": a GPU if there is one, else "cpu"), ``rank`` and
    ``world_size`` (else ``torch.distributed``, else the environment), ``epoch_size`` ("auto", "exhaust", "drop",
    "repeat"), ``shuffle_buffer``, ``shuffle_shards``, ``limit``, ``scorer`` ("cam", "attention" with
    ``weights=DIR``, "random", "none"), ``classifier`` ("mobilenet-v2", or "efficientnet-lite0/1/2" with
    ``classifier_weights=FILE``), ``classifier_weights``, ``keep_ratio`` (0.5) or ``keep_threshold`` or ``keep_mass``,
    ``min_keep``, ``max_keep``, ``extract`` ("tree", "flat"), ``class_threshold`` and ``class_temperature``
    (default: the classifier's calibration),
    ``second_threshold``, ``top_k``, ``min_prob``, ``vocabulary``, ``template``, ``mix``, ``image_size`` (224),
    ``patch_size`` (16), ``score_size``, ``jpeg_draft``, ``decode_workers``, ``collate_workers``,
    ``reader_workers``, ``capacity``, ``micro_batch``, ``model_workers``, ``intra_op_threads``, ``on_error``
    ("drop", "fail"),
    ``max_image_pixels``, ``max_member_bytes``, ``max_caption_bytes``, ``max_meta_bytes``, ``max_json_depth``,
    ``storage_options`` (dict), ``count_cache``, ``score_cache``, ``score_cache_max_bytes``, ``last_stage``.
    ``juicer.OPTIONS`` lists them. An unknown option raises ``TypeError``, a bad value ``ValueError``, each naming
    the option; a source or model that cannot be loaded raises ``JuicerError`` naming it.

    PyTorch conventions: ``len(loader)`` is the number of batches this rank yields in the epoch;
    ``set_epoch(n)``; ``state_dict()``/``load_state_dict()`` checkpoint the exact position (after the last batch
    yielded), so a restarted run continues with exactly the batches an uninterrupted one would have given.
    """

    def __init__(self, sources: Sources, *, as_torch: Optional[bool] = None, **options: Any) -> None:
        self._core = _juicer.Loader(_sources(sources), **_torch_world(options))
        self._as_torch = torch is not None if as_torch is None else bool(as_torch)
        if self._as_torch and torch is None:
            raise ValueError("option `as_torch`: torch is not installed")
        self._running: Optional["weakref.ReferenceType[_Epoch]"] = None
        self._last_summary: Optional[Dict[str, Any]] = None

    def __iter__(self) -> _Epoch:
        epoch = self._core.next_epoch()
        it = _Epoch(self._core.iter(), self, epoch)
        self._running = weakref.ref(it)
        return it

    def _epoch_running(self) -> Optional[_Epoch]:
        it = self._running() if self._running is not None else None
        return it if it is not None and it._core is not None else None

    def __len__(self) -> int:
        running = self._epoch_running()
        epoch = running.epoch if running is not None else self._core.next_epoch()
        return int(self._core.epoch_batches(epoch))

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration run ``epoch`` (a loaded state of that same epoch continues where it was)."""
        self._core.set_epoch(int(epoch))

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint: after the last batch yielded, or where the next iteration starts."""
        return json.loads(self._core.state_json())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Makes the next iteration continue exactly from ``state`` (validated: a state of another data set,
        seed or world, or a tampered one, raises ``JuicerError`` naming the field)."""
        self._core.load_state_json(json.dumps(state))

    def summary(self) -> Dict[str, Any]:
        """Counters of the running (or last) epoch: ``read == emitted + sum(dropped.values())``."""
        running = self._epoch_running()
        if running is not None:
            return running.summary()
        return dict(self._last_summary or {})

    @property
    def rank(self) -> int:
        return self._core.rank

    @property
    def world_size(self) -> int:
        return self._core.world_size

    @property
    def batch_size(self) -> int:
        return self._core.batch_size


_JUICERS: Dict[str, Any] = {}


def juice(
    images: Sequence[bytes],
    captions: Sequence[Optional[str]],
    keys: Optional[Sequence[str]] = None,
    *,
    as_torch: Optional[bool] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Juices one batch of encoded images (JPEG, PNG, WebP bytes) and their captions, on the calling thread with
    the GIL released: the stages of the loader, in order, without a data source. For use as a step of another
    pipeline (a Ray Data ``map_batches`` or a Hugging Face ``datasets.map(batched=True)``).

    Returns the batch dict ``Loader`` yields for the samples that made it, plus ``dropped``: a list of
    ``(key, reason, detail)`` for those that did not. ``keys`` default to the positions ``"0"``, ``"1"``, ...
    The models are loaded once per distinct set of options and kept for later calls.
    """
    images = [bytes(i) for i in images]
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    keys = [str(i) for i in range(len(images))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(images):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    as_torch = torch is not None if as_torch is None else bool(as_torch)
    cache_key = json.dumps(options, sort_keys=True, default=str)
    core = _JUICERS.get(cache_key)
    if core is None:
        core = _juicer.Loader.inline(**options)
        _JUICERS[cache_key] = core
    raw, dropped = core.juice(images, captions, keys)
    batch = _to_batch(raw, as_torch)
    batch["dropped"] = dropped
    return batch
