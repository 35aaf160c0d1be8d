"""Argument checks shared by the public functions: clear errors before anything is traced.

Every check raises ``InputError`` (a ``ValueError``), or ``InputTypeError`` (a ``TypeError``) for a
traced value given to a host-level function: ``kmjax.errors``, the errors a user can fix."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from kmjax.errors import InputError, InputTypeError


def is_tracer(x) -> bool:
    """Whether ``x`` is a value being traced by jit/vmap (its values are unknown until run)."""
    return isinstance(x, jax.core.Tracer)


def check_images(images) -> None:
    """Images are (N, H, W, C) with at least one image, and finite when they are floats.

    Device images are checked where they are: one fused pass, and only its flag pulled
    (explicitly); the per-image counts of the error message only when something is not finite."""
    shape = np.shape(images)
    if len(shape) != 4:
        hint = " (add a channel axis: images[..., None])" if len(shape) == 3 else ""
        raise InputError(f"images must have shape (N, H, W, C), got shape {shape}{hint}")
    if shape[0] == 0:
        raise InputError("images is empty: got 0 images")
    if is_tracer(images):
        return
    if isinstance(images, jax.Array):
        if images.dtype.kind != "f" or bool(jax.device_get(_all_finite(images))):
            return
        bad = jax.device_get(_bad_per_image(images))
    else:
        images = np.asarray(images)
        if images.dtype.kind != "f":
            return
        bad = ~np.isfinite(images)
        if not bad.any():
            return
        bad = bad.reshape(shape[0], -1).sum(axis=1)
    which = np.flatnonzero(bad)
    if which.size:
        raise InputError(f"images hold {int(bad.sum())} NaN or Inf values, in {which.size} of {shape[0]} images "
                         f"(the first: index {int(which[0])}); fix or drop those images")


@jax.jit
def _all_finite(x):
    # one fused pass on the array's own device, no host copy
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _bad_per_image(images):
    # (N,) the non-finite values of each image, counted on the device (the error message's)
    return jnp.sum(~jnp.isfinite(images.reshape(images.shape[0], -1)), axis=1, dtype=jnp.int32)


@jax.jit
def _n_bad(x):
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def check_matrix(x, name: str = "x") -> None:
    """A (N, D) array of N >= 1 finite values (finiteness checked only on concrete arrays; on a
    device array, in one fused pass whose flag alone is pulled, explicitly)."""
    shape = np.shape(x)
    if len(shape) != 2:
        raise InputError(f"{name} must be a 2-D array (N, D), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{name} is empty: shape {shape}")
    if is_tracer(x):
        return
    if isinstance(x, jax.Array):
        if bool(jax.device_get(_all_finite(x))):
            return
        bad = int(jax.device_get(_n_bad(x)))  # the error message's count, counted on the device
    else:
        bad = int((~np.isfinite(np.asarray(x))).sum())
    if bad:
        raise InputError(f"{name} contains {bad} NaN or Inf values; clean or drop those rows first")


def choice(value, choices, name: str, hint: str = "") -> str:
    """``value`` if it is one of the strings ``choices``; else an ``InputError`` that lists them.
    ``hint``: appended to the message (e.g. " or pass a (k, D) array")."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {tuple(choices)}{hint}")
    return value


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum] (NumPy integers welcome, bools and floats not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
            minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = {(True, False): f" >= {minimum}", (False, True): f" <= {maximum}",
                  (True, True): f" in [{minimum}, {maximum}]", (False, False): ""}
        raise InputError(f"{name} must be an integer{bounds[minimum is not None, maximum is not None]}, got {value!r}")
    return int(value)


def positive_int(value, name: str) -> int:
    """``value`` as a Python int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def number(value, name: str, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None) -> float:
    """``value`` as a Python float with ``value > above``, ``>= at_least``, ``< below`` (each if given);
    bools, NaN and non-numbers refused."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    ok = ok and value == value and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (below is None or value < below)
    if not ok:
        parts = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
                 f"< {below}" if below is not None else ""]
        raise InputError(f"{name} must be a number {' and '.join(p for p in parts if p)}, got {value!r}".replace(
            "a number , got", "a number, got"))
    return float(value)


def check_labels(labels, n: int, num_classes: int, rows=None) -> np.ndarray:
    """(n,) integer class indices in [0, num_classes) (only ``rows`` of them, if given), as a NumPy array."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise InputError(f"there are {n} rows of features but labels of shape {labels.shape}: one label per row")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    used = labels if rows is None else labels[rows]
    if used.size and (used.min() < 0 or used.max() >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got {used.min()}..{used.max()}")
    return labels


def host_only(name: str, instead: str, *values) -> None:
    """Refuse traced values in one line: ``kmjax.name`` is a host-level entry point (it loops on the
    host, or returns NumPy arrays or Python numbers), and ``instead`` works inside ``jax.jit``."""
    if any(is_tracer(v) for v in values):
        raise InputTypeError(f"kmjax.{name} is a host-level entry point and cannot run inside jax.jit; "
                        f"inside jit use {instead}")
