"""A checkpoint's pickle read without running it: which functions it calls and how much memory
it declares, checked before ``torch.load`` allocates anything.

``torch.load(weights_only=True)`` runs no arbitrary code, but the functions it allows still
allocate what a file declares: a 5 KB file could ask numpy for a 93 GiB array, ``bytes(n)`` or
``torch.UntypedStorage(n)`` for any ``n``, a tensor of 2**26 elements on a storage of one (stride
0), and an object-dtype array given a short list crashed numpy. :func:`scan_pickle` follows the
pickle's stack symbolically (the opcodes torch's weights-only unpickler accepts) and allows only
the calls a qmpc checkpoint makes, each within the bytes the file really holds:

* tensors: ``torch._utils._rebuild_tensor_v2`` on a storage whose declared size is its record's
  size, with no more elements than the storage;
* containers and parameters: ``collections.OrderedDict``, ``torch._utils._rebuild_parameter``,
  ``torch.nn.Parameter``, ``torch.Size``, ``torch.device``, ``set``, ``complex``;
* numpy arrays of checkpoints written before weights-only loading: ``numpy.dtype`` (numbers and
  booleans only), numpy's ``_reconstruct``, the array's state (its bytes the size its shape
  declares), ``_codecs.encode(…, 'latin1')`` and ``bytes``, within the file's size.
"""

from __future__ import annotations

import functools
import io
import math
import pickletools
import warnings
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

import numpy as np

__all__ = ["Disallowed", "Malformed", "Oversized", "scan_pickle"]


class Disallowed(ValueError):
    """The pickle calls a function a qmpc checkpoint does not (its name is the message)."""


class Oversized(ValueError):
    """The pickle declares more memory than the file holds."""


class Malformed(ValueError):
    """The pickle cannot be followed (damaged)."""


class _Global(str):
    """A global the pickle refers to, by its full name."""


class _Made:
    """What a call returns: ``kind`` (``"storage"``, ``"tensor"``, ``"ndarray"``, ``"dtype"``,
    ``"other"``) and ``size`` (a storage's elements, a dtype's item size)."""

    __slots__ = ("kind", "size")

    def __init__(self, kind: str, size: int = 0):
        self.kind, self.size = kind, size


class _List(list):
    """A list, dict or set of the pickle (its contents do not matter here)."""


_FREE = {
    "collections.OrderedDict",
    "torch._utils._rebuild_parameter",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    "torch.device",
    "builtins.set",
    "builtins.complex",
}
_TENSOR = {"torch._utils._rebuild_tensor_v2"}
_RECONSTRUCT = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"}


@functools.cache
def _storage_item_sizes() -> dict[str, int]:
    """``torch.FloatStorage`` (and ``torch.cuda.…``) -> 4, etc.: the storage types a pickle names."""
    import torch

    sizes = {}
    with warnings.catch_warnings():  # "TypedStorage is deprecated"
        warnings.simplefilter("ignore")
        for name in dir(torch):
            dtype = getattr(getattr(torch, name), "dtype", None) if name.endswith("Storage") else None
            if name != "TypedStorage" and isinstance(dtype, torch.dtype):
                sizes[f"torch.{name}"] = sizes[f"torch.cuda.{name}"] = dtype.itemsize
    return sizes


def scan_pickle(pkl: bytes, records: dict[str, int], limit: int) -> None:
    """Follow the pickle ``pkl`` of a checkpoint whose storage records (``key -> bytes``) are
    ``records`` and whose file holds ``limit`` bytes. Raises :class:`Disallowed`,
    :class:`Oversized` or :class:`Malformed`; returns when nothing is wrong (or at an opcode
    torch's weights-only unpickler refuses anyway, before it runs anything)."""
    try:
        _Scan(records, limit).run(pkl)
    except (IndexError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, Disallowed | Oversized | Malformed):
            raise
        raise Malformed(f"{type(e).__name__}: {e}") from None


class _Scan:
    def __init__(self, records: dict[str, int], limit: int):
        self.records, self.limit = records, limit
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, object] = {}
        self.item_sizes = _storage_item_sizes()

    def pop_mark(self) -> list:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def run(self, pkl: bytes) -> None:
        s = self.stack
        for op, arg, _pos in pickletools.genops(io.BytesIO(pkl)):
            name = op.name
            if name in ("PROTO", "STOP"):
                continue
            if name in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING"):
                s.append(arg)
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                s.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name == "EMPTY_TUPLE":
                s.append(())
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                s.append(_List())
            elif name == "MARK":
                self.marks.append(s)
                s = self.stack = []
            elif name == "TUPLE":
                items = self.pop_mark()
                s = self.stack
                s.append(tuple(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                if len(s) < k:
                    raise Malformed(f"{name} on a stack of {len(s)}")
                s[-k:] = [tuple(s[-k:])]
            elif name in ("BINPUT", "LONG_BINPUT"):
                self.memo[arg] = s[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                s.append(self.memo[arg])
            elif name in ("APPEND", "SETITEM"):
                del s[-(1 if name == "APPEND" else 2) :]
            elif name in ("APPENDS", "SETITEMS"):
                self.pop_mark()
                s = self.stack
            elif name == "GLOBAL":
                module, attr = arg.split(" ", 1)
                module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
                s.append(_Global(f"{module}.{attr}"))
            elif name == "REDUCE":
                args = s.pop()
                s[-1] = self.call(s[-1], args)
            elif name == "NEWOBJ":
                args = s.pop()
                s[-1] = self.call(s[-1], args)
            elif name == "BUILD":
                self.build(s[-2], s.pop())
            elif name == "BINPERSID":
                s.append(self.storage(s.pop()))
            else:  # an opcode torch's weights-only unpickler refuses: it stops there, so do we
                return

    def call(self, func, args) -> object:
        if not isinstance(func, _Global):
            raise Disallowed(type(func).__name__)
        if not isinstance(args, tuple):
            raise Malformed(f"arguments of {func} are not a tuple")
        if func in _FREE:
            return _Made("other")
        if func in _TENSOR:
            storage, size = args[0], args[2]
            if not (isinstance(storage, _Made) and storage.kind == "storage"):
                raise Malformed(f"{func} without a storage")
            n = self.count(size, "tensor shape")
            if n > storage.size:
                raise Oversized(f"a tensor of {n} elements on a storage of {storage.size}")
            return _Made("tensor")
        if func == "_codecs.encode":
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
                raise Disallowed(f"{func} of {args[1:]!r}")
            return args[0].encode("latin1")
        if func == "numpy.dtype":
            if not args or not isinstance(args[0], str | bytes):
                raise Malformed("numpy.dtype without a type code")
            dt = np.dtype(args[0])
            if dt.kind not in "biufc":
                raise Disallowed(f"numpy.dtype({args[0]!r})")
            return _Made("dtype", dt.itemsize)
        if func in _RECONSTRUCT:
            if len(args) != 3 or not isinstance(args[0], _Global) or args[0] != "numpy.ndarray":
                raise Disallowed(f"{func} of {args[:1]!r}")
            self.bytes_of(args[1], self.item_size(args[2]), "numpy array")
            return _Made("ndarray")
        if func in ("builtins.bytes", "builtins.bytearray"):
            return self.bytes_call(func, args)
        raise Disallowed(str(func))

    def bytes_call(self, func: str, args: tuple) -> object:
        """``bytes()``, ``bytes(b)``, ``bytes(s, 'latin1')``, ``bytes(n)`` (``n`` within the file's
        size) or ``bytes(list)``."""
        if not args:
            return b""
        a = args[0]
        if isinstance(a, bytes):
            return a
        if isinstance(a, str) and args[1:] in (("latin1",), ("latin-1",)):
            return a.encode("latin1")
        if isinstance(a, int) and not isinstance(a, bool):
            if not 0 <= a <= self.limit:
                raise Oversized(f"{func}({a}) ({a} bytes)")
            return _Made("bytes", a)
        if isinstance(a, _List):
            return _Made("other")
        raise Disallowed(f"{func} of {type(a).__name__}")

    def build(self, inst, state) -> None:
        """``BUILD``: an ndarray's state must hold exactly the bytes its shape declares."""
        if isinstance(inst, _Made) and inst.kind == "ndarray":
            raw = state[4] if isinstance(state, tuple) and len(state) == 5 else None
            held = len(raw) if isinstance(raw, bytes) else None
            if isinstance(raw, _Made) and raw.kind == "bytes":
                held = raw.size
            if held is None:
                raise Disallowed("a numpy array whose data are not bytes")
            n = self.bytes_of(state[1], self.item_size(state[2]), "numpy array")
            if n != held:
                raise Oversized(f"a numpy array of {n} bytes with {held} bytes of data")
        elif not isinstance(inst, _Made):
            raise Disallowed(f"setting the state of {type(inst).__name__}")

    def storage(self, pid) -> _Made:
        """``BINPERSID``: ``('storage', type, key, location, elements)``, sized as its record."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Disallowed(f"persistent id {pid!r:.80}")
        kind, key, n = pid[1], pid[2], pid[4]
        ok = isinstance(kind, _Global) and kind in self.item_sizes and isinstance(key, str)
        if not ok or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise Malformed(f"storage {pid!r:.80}")
        declared = n * self.item_sizes[kind]
        if key not in self.records:
            raise Malformed(f"storage {key!r} without its record")
        if declared != self.records[key]:
            raise Oversized(f"storage {key} of {declared} bytes whose record holds {self.records[key]}")
        return _Made("storage", n)

    def count(self, shape, what: str) -> int:
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            raise Malformed(f"{what} {shape!r:.80}")
        if any(d < 0 for d in shape):
            raise Malformed(f"{what} {shape!r:.80}")
        return math.prod(shape)

    def item_size(self, dtype) -> int:
        if isinstance(dtype, _Made) and dtype.kind == "dtype":
            return dtype.size
        if isinstance(dtype, bytes | str):
            dt = np.dtype(dtype)
            if dt.kind not in "biufc":
                raise Disallowed(f"numpy.dtype({dtype!r})")
            return dt.itemsize
        raise Malformed(f"dtype {dtype!r:.80}")

    def bytes_of(self, shape, item: int, what: str) -> int:
        n = self.count(shape, f"{what} shape") * item
        if n > self.limit:
            raise Oversized(f"a {what} of shape {shape} ({n} bytes)")
        return n
