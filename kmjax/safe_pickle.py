"""A pickle reader that runs no code: for CIFAR-10's python batches, which are pickles.

A plain ``pickle.load`` calls whatever a crafted file names. ``safe_loads`` admits only the NumPy
array constructors the official files use: every opcode is checked before anything is built, and
the unpickler's ``find_class`` checks again as it builds. Anything else raises ``RefusedPickle``.
"""

from __future__ import annotations

import codecs
import io
import pickle
import pickletools

import numpy as np

from kmjax.errors import KmjaxError

__all__ = ["RefusedPickle", "safe_loads"]


# The globals a CIFAR-10 batch may name: the official files (written by Python 2's NumPy) name
# the first three; NumPy 2 writes its array reconstructor under numpy._core, and Python 3's
# protocols 2-3 rebuild an array's bytes with _codecs.encode. Nothing else is ever looked up, so
# a crafted file cannot make the unpickler call anything but these constructors.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
# Opcodes that call something outside the checked names, or hand an object to an external
# loader: none occurs in a CIFAR-10 batch; each is refused before anything is built.
_REFUSED_OPCODES = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}
_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE8"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as f  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct as f
    return f


class RefusedPickle(KmjaxError, pickle.UnpicklingError):
    """A pickle asks for something a CIFAR-10 batch never needs (a file to replace, not a bug)."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and NumPy arrays (see ``_ALLOWED_GLOBALS``)."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise RefusedPickle(f"names {module}.{name}")
        if module == "_codecs":
            return codecs.encode
        return _reconstruct() if name == "_reconstruct" else getattr(np, name)


def _check_opcodes(data: bytes) -> None:
    """Refuse a pickle that names any global or uses any opcode a CIFAR-10 batch does not, before
    any of its objects is built (the unpickler's ``find_class`` checks again as it builds).

    Python 2 pickles name a global inline (GLOBAL "module name"); Python 3's protocols 4 and 5
    push the two names as strings first (STACK_GLOBAL), possibly from the memo: the strings pushed
    just before are tracked, and a STACK_GLOBAL whose names are not plain strings is refused.
    """
    memo: dict = {}
    recent: list = []  # values pushed by string and memo-get opcodes since the last other opcode
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _REFUSED_OPCODES:
            raise RefusedPickle(f"uses the pickle opcode {name}")
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            if (module, attr) not in _ALLOWED_GLOBALS:
                raise RefusedPickle(f"names {module}.{attr}")
        elif name == "STACK_GLOBAL":
            pair = recent[-2:]
            if len(pair) != 2 or not all(isinstance(v, (str, bytes)) for v in pair):
                raise RefusedPickle("names a global it computes")
            module, attr = (v.decode("latin1") if isinstance(v, bytes) else v for v in pair)
            if (module, attr) not in _ALLOWED_GLOBALS:
                raise RefusedPickle(f"names {module}.{attr}")
        if name in _STRING_OPCODES:
            recent.append(arg)
        elif name in _MEMO_GET:
            recent.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _MEMO_PUT:
            memo[arg] = recent[-1] if recent else None
        else:
            recent = []


def safe_loads(data: bytes):
    """The object pickled in ``data``, built only if it names nothing but ``_ALLOWED_GLOBALS``
    (``RefusedPickle`` otherwise). ``encoding="bytes"`` reads the official Python-2 pickles: their
    str keys become bytes."""
    _check_opcodes(data)
    return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
