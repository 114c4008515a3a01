"""Hot operations of EarlyTom / HoliTom with two implementations and one dispatcher.

- ``frame_cosine(a, b)``: (F, T, D) x 2 -> (F,) float32, mean over tokens of the token-aligned cosine.
- ``window_argmax(scores, windows)``: (N, L), (N,) -> (N, max(windows)) int64, argmax per 1-D raster window.
- ``scatter_mean(values, index, base)``: (M, D), (M,), (K, D) -> (K, D), true-mean merge into kept tokens.

``reference`` (pure torch, any device) defines the semantics; ``triton_impl`` holds Triton kernels.
The dispatcher picks Triton only when the data tensors (not ``windows`` / ``index``, which are moved
along) are on CUDA, Triton imports with an active driver and no input needs a gradient (the kernels
have no backward); otherwise, and so on CPU in production, the torch reference. ``backend="torch"``
or ``"triton"`` forces a path per call (configuration is explicit: no environment variable picks
it). Forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1`` in the
environment before the kernel module is first imported (the tests do this in a subprocess). The
Triton module is imported lazily: importing this package never imports triton.

``record_calls()`` lists the calls made inside a block (operation, backend, shapes, dtypes): the
sizes a real run uses, at which benchmarks/gpu_check.py times each kernel against its reference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import reference

__all__ = ["BACKENDS", "KernelCall", "frame_cosine", "record_calls", "reference", "scatter_mean", "select_backend",
           "triton_available", "window_argmax"]

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelCall:
    """One dispatched call: enough to rebuild inputs of the same sizes (``windows``: window_argmax's counts)."""

    op: str
    backend: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    windows: tuple[int, ...] | None = None


_recorders: list[list[KernelCall]] = []


@contextmanager
def record_calls() -> Iterator[list[KernelCall]]:
    """Collects every kernel call made inside the block (nested blocks each see them all)."""
    calls: list[KernelCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _note(op: str, backend: str, *tensors: Tensor, windows: Tensor | None = None) -> None:
    call = KernelCall(op, backend, tuple(tuple(t.shape) for t in tensors), tuple(str(t.dtype).removeprefix("torch.")
                      for t in tensors), None if windows is None else tuple(int(w) for w in windows.tolist()))
    for calls in _recorders:
        calls.append(call)


@functools.cache
def triton_available() -> bool:
    """Triton imports and has an active (GPU) driver. Cached: checked once per process."""
    try:
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception:  # ImportError, "0 active drivers", a broken CUDA set-up: all mean no
        return False
    return True


def _impl() -> ModuleType:
    from . import triton_impl

    return triton_impl


def select_backend(*tensors: Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch' for these tensors (``backend=None``: automatic)."""
    choice = backend if backend is not None else "auto"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        # The kernels have no backward: autograd inputs keep the differentiable reference.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return "triton" if on_cuda and not needs_grad and triton_available() else "torch"
    # forced
    if on_cuda:
        if not triton_available():
            raise RuntimeError("backend='triton' was forced but Triton has no active GPU driver")
        return "triton"
    if any(t.is_cuda for t in tensors):
        raise ValueError("backend='triton' needs all tensors on one device, got a mix of CUDA and CPU")
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not _impl().INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before tokcomp.ops.kernels.triton_impl is first imported (e.g. in a fresh process)"
        )
    return "triton"


def frame_cosine(a: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """Per row f, the mean over the T positions of cos(a[f, t], b[f, t]); (F, T, D) x 2 -> (F,) float32."""
    chosen = select_backend(a, b, backend=backend)
    if _recorders:
        _note("frame_cosine", chosen, a, b)
    if chosen == "triton":
        return _impl().frame_cosine(a, b)
    return reference.frame_cosine(a, b)


def window_argmax(scores: Tensor, windows: Tensor, *, backend: str | None = None) -> Tensor:
    """Argmax position of each of windows[n] contiguous 1-D windows of row n; (N, max(windows)) int64, -1 padded."""
    chosen = select_backend(scores, backend=backend)
    if _recorders:
        _note("window_argmax", chosen, scores, windows, windows=windows)
    if chosen == "triton":
        return _impl().window_argmax(scores, windows)
    return reference.window_argmax(scores, windows)


def scatter_mean(values: Tensor, index: Tensor, base: Tensor, *, backend: str | None = None) -> Tensor:
    """out[k] = (base[k] + sum of values[m] with index[m] == k) / (1 + count_k); (K, D) in base's dtype."""
    chosen = select_backend(values, base, backend=backend)
    if _recorders:
        _note("scatter_mean", chosen, values, index, base)
    if chosen == "triton":
        return _impl().scatter_mean(values, index, base)
    return reference.scatter_mean(values, index, base)
