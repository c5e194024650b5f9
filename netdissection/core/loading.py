"""Batches of samples from a concept dataset, decoded ahead of the model in worker processes."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .descriptors import RAISE_IT, is_out_of_descriptors, out_of_descriptors
from .errors import DissectionError, first_line
from .packing import packed, unpacked
from .protocols import ConceptDataset

log = logging.getLogger(__name__)


#: Label numbers travel as int32 (Broden's are below 2^16); anything outside it is no label number.
LABEL_MAX = 2**31 - 1

#: ``prepare(layers, image_labels)``: work on a batch's labels done in the loader's worker processes,
#: beside the main process's work (the IoU pass's label preparation); its result is ``Batch.prepared``, in
#: place of the raw labels.
Prepare = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class Batch:
    """Consecutive samples of one size. ``indices`` are dataset positions. Loaded with a ``prepare``, a batch
    carries its labels as ``prepared`` only (``layers`` and ``image_labels`` None)."""

    indices: np.ndarray
    images: torch.Tensor | None  # (N, H, W, 3) uint8
    layers: torch.Tensor | None  # (N, K, sh, sw) int32, padded with 0
    image_labels: torch.Tensor | None  # (N, J) int64, padded with 0
    label_shape: tuple[int, int]
    failures: list[str]
    failed: list[int] = field(default_factory=list)  # the dataset positions of ``failures``, in their order
    prepared: Any = None  # what ``iterate(prepare=...)`` made of the labels

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (the DataLoader calls this when it pins): copies to a GPU are
        then asynchronous."""
        def pin(value: Any) -> Any:
            return value.pin_memory() if hasattr(value, "pin_memory") else value

        prepared = tuple(pin(v) for v in self.prepared) if isinstance(self.prepared, tuple) else pin(self.prepared)
        return replace(self, images=pin(self.images), layers=pin(self.layers), image_labels=pin(self.image_labels),
                       prepared=prepared)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # From a loader worker to the main process: every tensor in one shared block (see ``packing``).
        return _unpacked_batch, packed({f.name: getattr(self, f.name) for f in fields(self)})


def _unpacked_batch(payload: bytes, block: torch.Tensor, layout: Any) -> Batch:
    return Batch(**unpacked(payload, block, layout))


class _Failed:
    """A sample that could not be loaded; carried to the main process as data, not as a traceback."""

    def __init__(self, index: int, message: str) -> None:
        self.index, self.message = index, message


def _sample_name(dataset: ConceptDataset, index: int) -> str:
    """``sample N (its image file)`` when the dataset can say which file it is."""
    try:
        return f"sample {index} ({dataset.image_path(index)})"  # type: ignore[attr-defined]
    except Exception:  # no image_path, or the very row is what fails
        return f"sample {index}"


class _Parts(Dataset):
    def __init__(self, dataset: ConceptDataset, image: bool, labels: bool) -> None:
        self.dataset, self.image, self.labels = dataset, image, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        try:
            return self.dataset.load(index, image=self.image, labels=self.labels)
        except DissectionError as exc:
            return _Failed(index, str(exc))
        except Exception as exc:
            # Whatever a decoder or a dataset plugin raises on a stranger's file: in a worker process it would
            # come back to the main process as a many-line "Caught ... in DataLoader worker" traceback.
            # It comes back as data instead, naming the sample; the traceback goes to the debug log.
            log.debug("loading sample %d failed", index, exc_info=True)
            return _Failed(index, f"{_sample_name(self.dataset, index)} could not be loaded: "
                                  f"{type(exc).__name__}" + (f": {first_line(exc)}" if str(exc).strip() else ""))


def _odd_sizes(dataset: ConceptDataset, samples: list) -> list:  # type: ignore[type-arg]
    """Samples of another image or label size than the batch's first (a batch is one array: they cannot
    join it, and a run takes one image size), as failures naming them."""
    first = samples[0]
    image_shape = None if first.image is None else first.image.shape
    out = []
    for s in samples:
        if image_shape is not None and s.image is not None and s.image.shape != image_shape:
            out.append(_Failed(s.index, f"{_sample_name(dataset, s.index)} is {s.image.shape[0]}×{s.image.shape[1]} "
                                        f"(h×w) but sample {first.index} is {image_shape[0]}×{image_shape[1]}: "
                                        "the images of a run share one size"))
        elif tuple(s.label_shape) != tuple(first.label_shape) or (
                s.layers is not None and tuple(s.layers.shape[1:]) != tuple(s.label_shape)):
            out.append(_Failed(s.index, f"{_sample_name(dataset, s.index)} has labels of size "
                                        f"{tuple(s.layers.shape[1:]) if s.layers is not None else s.label_shape} but "
                                        f"sample {first.index} {tuple(first.label_shape)}: the labels of a run "
                                        "share one size"))
        else:
            out.append(s)
    return out


def _collate(samples: list, *, dataset: ConceptDataset, prepare: Prepare | None = None) -> Batch:  # type: ignore[type-arg]
    good = [s for s in samples if not isinstance(s, _Failed)]
    if good:
        samples = [s for s in samples if isinstance(s, _Failed)] + _odd_sizes(dataset, good)
    failures = [s.message for s in samples if isinstance(s, _Failed)]
    failed = [s.index for s in samples if isinstance(s, _Failed)]
    good = [s for s in samples if not isinstance(s, _Failed)]
    indices = np.array([s.index for s in good], dtype=np.int64)
    if not good:
        return Batch(indices, None, None, None, (0, 0), failures, failed)
    images = None
    if good[0].image is not None:
        images = torch.from_numpy(np.stack([s.image for s in good]))
    layers = image_labels = None
    shape = good[0].label_shape
    if good[0].layers is not None:
        k = max(s.layers.shape[0] for s in good)
        stacked = np.zeros((len(good), k, *shape), dtype=np.int32)
        for i, s in enumerate(good):
            values = s.layers
            if values.dtype.itemsize > 4 or values.dtype.kind == "u":
                values = np.where((values >= 0) & (values <= LABEL_MAX), values, 0)
            stacked[i, : s.layers.shape[0]] = values
        layers = torch.from_numpy(stacked)
        j = max((len(s.image_labels) for s in good), default=0)
        levels = np.zeros((len(good), j), dtype=np.int64)
        for i, s in enumerate(good):
            levels[i, : len(s.image_labels)] = s.image_labels
        image_labels = torch.from_numpy(levels)
    if prepare is not None and layers is not None:
        # The prepared labels replace the raw ones: the batch then carries its labels once.
        return Batch(indices, images, None, None, shape, failures, failed, prepare(layers, image_labels))
    return Batch(indices, images, layers, image_labels, shape, failures, failed)


#: How much lower the loader's worker processes run than the process that runs the model (``os.nice``). On a
#: machine with few cores the model's threads and the counting are a run's critical path, while the workers
#: decode a few batches ahead and can wait: run beside them at the same priority, a worker that takes a core
#: in the middle of a parallel operation holds the whole operation up. Measured on 2 cores (resnet18
#: layer4+layer3, 2,000 Broden-hard images, whole runs in alternation): the IoU pass 4.9 s against 6.0 s
#: (medians of 5 and 8 runs), the run 38.5 against 39.1 s; +19 and +5 measured alike. Only under
#: contention does it matter: a worker with a core to itself runs as fast.
LOADER_NICENESS = 10


def lower_priority(_worker: int = 0) -> None:
    """The DataLoader's ``worker_init_fn``: this process's niceness raised by ``LOADER_NICENESS`` (where the
    platform has niceness, and as far as it goes: 19 is the lowest priority)."""
    if hasattr(os, "nice"):
        try:
            os.nice(LOADER_NICENESS)
        except OSError as exc:  # never expected (raising one's own niceness needs no privilege): run as is
            log.debug("loader worker left at its priority: %s", exc)


def start_worker(_worker: int = 0) -> None:
    """The DataLoader's ``worker_init_fn``: :func:`lower_priority`, and a batch that cannot be handed over
    left for the main process to report (see :func:`worker_fault`).

    Out of file descriptors, multiprocessing's sending threads in the worker print a traceback of their own
    (its queue's feeder through ``Queue._on_queue_feeder_error``, its handle server through
    ``sys.excepthook``) before the main process finds out; here they go to the debug log instead."""
    import multiprocessing.queues
    import sys

    lower_priority()

    def logged(exc: BaseException, _obj: object = None) -> None:
        log.debug("a loader worker could not hand a batch over: %s", first_line(exc))

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(logged)  # type: ignore[method-assign]
    sys.excepthook = lambda _type, value, _traceback: logged(value)


def default_workers() -> int:
    """Worker processes for decoding: one fewer than the cores, at least one, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def iterate(dataset: ConceptDataset, *, batch_size: int, workers: int, image: bool, labels: bool,
            skip_bad: bool, pin_memory: bool = False, indices: Sequence[int] | None = None,
            log_skipped: bool = True, prepare: Prepare | None = None) -> Generator[Batch, None, None]:
    """Batches in dataset order (or of the dataset ``indices``, in their order). A sample that
    fails to load stops the run with its message, unless ``skip_bad`` is set, when it is skipped,
    logged (unless not ``log_skipped``: a later pass over samples skipped already) and reported in
    ``Batch.failures``. ``prepare`` runs on each batch's labels in the worker processes (``Batch.prepared``).

    The worker processes start at once and decode ahead: a caller may start a pass's loader before it needs
    the first batch (``dissect`` starts the activation pass's while it builds the model). Closing the
    iterator, or dropping it, stops them."""
    loader = DataLoader(
        _Parts(dataset, image, labels),
        batch_size=batch_size,
        shuffle=False,
        sampler=None if indices is None else [int(i) for i in indices],
        num_workers=workers,
        collate_fn=functools.partial(_collate, dataset=dataset, prepare=prepare),
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=start_worker if workers > 0 else None,
    )
    before = signal.getsignal(signal.SIGCHLD) if _may_set_signals(workers) else None
    try:
        batches = iter(loader)  # the workers start
    except (RuntimeError, OSError) as exc:  # OSError: no descriptor left for a worker's pipes
        error = worker_fault(exc, workers)
        if error is None:
            raise
        # From the handler: the loader's half-started iterator stays with the original exception, whose
        # end would run torch's clean-up of it, which fails on a half-built one with a traceback of its own.
        raise error from None
    finally:
        if before is not None:
            signal.signal(signal.SIGCHLD, before)
    return _checked(batches, skip_bad=skip_bad, log_skipped=log_skipped, workers=workers)


def _may_set_signals(workers: int) -> bool:
    """Whether the loader's start sets torch's SIGCHLD handler, which :func:`iterate` takes off again.

    That handler raises the "DataLoader worker ... is killed" error asynchronously, wherever the main thread is
    when a worker dies: in the middle of the forward pass, a cache write or an import — where a library may turn
    it into something else (an import under way raises ImportError: "needs the package onnxruntime") or leave
    its state half-changed. Without it the loader itself notices the death in ``next`` (it checks its workers
    every few seconds while it waits), and :func:`_checked` says it in one line. torch sets no handler in a
    thread other than the main one either."""
    return (workers > 0 and hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGCHLD) is not None)


def worker_fault(exc: BaseException, workers: int) -> DissectionError | None:
    """The one-line error for a loader worker process that died — killed from outside (most often by the
    kernel, out of memory) or crashed in native code — or that can no longer hand its batches over (the
    process is out of file descriptors: torch's message says so), or None when ``exc`` is anything else.

    torch says so with a ``RuntimeError`` naming the "DataLoader worker" when it finds the worker gone. A
    worker that dies while the main process is fetching a batch it sent (a batch's memory comes by way of
    the worker's own socket) shows instead as a broken connection, before torch can tell that the worker is
    gone; with workers there is no other connection ``next`` could lose."""
    if is_out_of_descriptors(exc):  # each batch a worker hands over travels as a file descriptor
        return out_of_descriptors("the data loading workers", f"{RAISE_IT} or rerun with --workers 0")
    if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
        what = first_line(exc)
    elif workers > 0 and isinstance(exc, ConnectionError | EOFError):
        what = f"a batch it sent could not be received: {type(exc).__name__}: {first_line(exc)}"
    else:
        return None
    return DissectionError(f"a data loading worker process died ({what}); a sample may need more memory than is "
                           "free: rerun with --workers 0 to see which")


def _checked(batches: Iterator[Batch], *, skip_bad: bool, log_skipped: bool,
             workers: int) -> Generator[Batch, None, None]:
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError, EOFError) as exc:  # OSError: ConnectionError, EMFILE
            error = worker_fault(exc, workers)
            if error is None:
                raise
            raise error from None
        if batch.failures and not skip_bad:
            raise DissectionError(f"{batch.failures[0]} (pass --skip-bad to skip unreadable samples)")
        for message in batch.failures if log_skipped else ():
            log.warning("skipped: %s", message)
        yield batch
