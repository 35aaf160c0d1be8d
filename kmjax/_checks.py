"""Argument checks shared by the public functions: clear errors before anything is traced."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp


def is_tracer(x) -> bool:
    """Whether ``x`` is a value being traced by jit/vmap (its values are unknown until run)."""
    return isinstance(x, jax.core.Tracer)


def check_images(images) -> None:
    """Images are (N, H, W, C) with at least one image, and finite when they are floats."""
    shape = np.shape(images)
    if len(shape) != 4:
        hint = " (add a channel axis: images[..., None])" if len(shape) == 3 else ""
        raise ValueError(f"images must have shape (N, H, W, C), got shape {shape}{hint}")
    if shape[0] == 0:
        raise ValueError("images is empty: got 0 images")
    if is_tracer(images) or np.asarray(images[:0]).dtype.kind != "f":
        return
    bad = ~np.isfinite(np.asarray(images))
    if bad.any():
        which = np.flatnonzero(bad.reshape(shape[0], -1).any(axis=1))
        raise ValueError(f"images hold {int(bad.sum())} NaN or Inf values, in {which.size} of {shape[0]} images "
                         f"(the first: index {int(which[0])}); fix or drop those images")


@jax.jit
def _all_finite(x):
    # one fused pass on the array's own device, no host copy
    return jnp.all(jnp.isfinite(x))


def check_matrix(x, name: str = "x") -> None:
    """A (N, D) array of N >= 1 finite values (finiteness checked only on concrete arrays)."""
    shape = np.shape(x)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    if is_tracer(x):
        return
    if isinstance(x, jax.Array) and bool(_all_finite(x)):
        return
    bad = int((~np.isfinite(np.asarray(x))).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf values; clean or drop those rows first")


def positive_int(value, name: str) -> int:
    """``value`` as a Python int >= 1 (NumPy integers welcome, bools and floats not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def host_only(name: str, instead: str, *values) -> None:
    """Refuse traced values in one line: ``kmjax.name`` is a host-level entry point (it loops on the
    host, or returns NumPy arrays or Python numbers), and ``instead`` works inside ``jax.jit``."""
    if any(is_tracer(v) for v in values):
        raise TypeError(f"kmjax.{name} is a host-level entry point and cannot run inside jax.jit; "
                        f"inside jit use {instead}")
