"""What goes over the wire: msgpack for structure, raw buffers for arrays, never pickle.

:func:`encode` turns a value into one msgpack header and a list of buffers (numpy arrays, sent
as they are in memory, no copy); :func:`decode` reverses it, with arrays viewing the received
buffers. Besides msgpack's own types it carries numpy arrays and scalars and the appkit data
objects (TimeStep, Property, Mesh, Field, FieldRef). Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from gridcouple.appkit.data import Field, Mesh, Property, TimeStep
from gridcouple.appkit.store import FieldRef

_ARRAY = 1
_OBJECT = 2
_OBJECT_TYPES: dict[str, Any] = {
    "TimeStep": TimeStep, "Property": Property, "Field": Field, "FieldRef": FieldRef,
    "Mesh": Mesh,
}


def encode(value: Any) -> tuple[bytes, list[memoryview]]:
    """The msgpack header and the raw buffers that carry ``value``."""
    try:  # plain values (numbers, strings, lists, dicts): msgpack alone, at a third the cost
        return msgpack.packb(value), []
    except TypeError:
        pass
    buffers: list[memoryview] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}")
            array = obj if obj.flags.c_contiguous else obj.copy(order="C")  # keeps 0-d 0-d
            buffers.append(array.reshape(-1).view(np.uint8).data)
            header = [array.dtype.str, list(array.shape), len(buffers) - 1]
            return msgpack.ExtType(_ARRAY, msgpack.packb(header))
        if isinstance(obj, np.generic):
            return obj.item()
        for name, kind in _OBJECT_TYPES.items():
            if isinstance(obj, kind):
                payload = msgpack.packb([name, obj.to_wire()], default=default)
                return msgpack.ExtType(_OBJECT, payload)
        if isinstance(obj, set | frozenset):
            return list(obj)
        raise TypeError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__}; "
                        "send numbers, strings, lists, dicts, numpy arrays or appkit objects")

    return msgpack.packb(value, default=default), buffers


def decode(header: bytes | bytearray, buffers: Sequence[Any]) -> Any:
    """The value :func:`encode` sent; arrays are views of ``buffers`` (writable if they are).
    Whatever the bytes, the only error is ValueError ("malformed frame: ...")."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _ARRAY:
            dtype, shape, index = msgpack.unpackb(data)
            kind = np.dtype(dtype)
            if kind.hasobject or kind.fields is not None or kind.subdtype is not None:
                raise ValueError(f"arrays of dtype {kind} are not carried")
            if not (isinstance(index, int) and 0 <= index < len(buffers)):
                raise ValueError(f"array buffer {index!r} is not in the frame")
            return np.frombuffer(buffers[index], dtype=kind).reshape(tuple(shape))
        if code == _OBJECT:
            name, payload = msgpack.unpackb(data, ext_hook=ext_hook, strict_map_key=False)
            if not isinstance(name, str) or name not in _OBJECT_TYPES:
                raise ValueError(f"unknown object type {name!r} on the wire")
            return _OBJECT_TYPES[name].from_wire(payload)
        raise ValueError(f"unknown msgpack extension type {code}")

    try:
        return msgpack.unpackb(header, ext_hook=ext_hook, strict_map_key=False)
    except Exception as exc:  # msgpack's, numpy's, an object's own check: all mean bad bytes
        raise ValueError(f"malformed frame: {type(exc).__name__}: {exc}") from exc
