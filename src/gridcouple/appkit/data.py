"""The data objects applications exchange: TimeStep, Property, Mesh and Field.

Every object turns into a plain dict of numbers, strings and numpy arrays with ``to_wire`` and
back with ``from_wire``; the transport and the field store carry nothing else (no pickle).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

ValueType = Literal["scalar", "vector", "tensor"]
Location = Literal["vertex", "cell"]

FIELD_ID_PATTERN = re.compile(r"[A-Za-z0-9_.+-]{1,128}")

# VTK cell type names and how many vertices each has (the unstructured mesh accepts these).
_COMPONENTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "scalar": ((),), "vector": ((2,), (3,)), "tensor": ((2, 2), (3, 3)),
}

CELL_SIZES: dict[str, int] = {
    "vertex": 1, "line": 2, "triangle": 3, "quad": 4, "tetra": 4, "hexahedron": 8,
    "wedge": 6, "pyramid": 5,
}


@dataclass(frozen=True)
class TimeStep:
    """One step of a coupled simulation: it ends at ``time``, is ``dt`` long, and is the
    ``number``-th step. ``target_time`` is where the whole simulation ends."""

    time: float
    dt: float
    number: int = 0
    target_time: float | None = None
    units: str = "s"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time) and math.isfinite(self.dt)):
            raise ValueError(f"TimeStep time and dt must be finite, got {self.time}, {self.dt}")
        if self.dt < 0:
            raise ValueError(f"TimeStep.dt must not be negative, got {self.dt}")

    # MuPIF's accessor names, so ported applications keep working.
    def getTime(self) -> float:
        return self.time

    def getTimeIncrement(self) -> float:
        return self.dt

    def getNumber(self) -> int:
        return self.number

    def to_wire(self) -> dict[str, Any]:
        return {"time": self.time, "dt": self.dt, "number": self.number,
                "target_time": self.target_time, "units": self.units}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TimeStep:
        return cls(**data)


@dataclass(frozen=True)
class Property:
    """A value an application reports or accepts: a number (scalar), a 1-D array (vector) or
    a 2-D array (tensor).

    Only ``value`` is positional; the rest are keywords, so neither MuPIF's order
    (``value, propID, valueType, unit, time, objectID``) nor ``value, units, time`` can put an
    argument in the wrong place: ``Property(1.0, property_id="c", units="K", time=0.5)``.
    """

    value: Any
    _: KW_ONLY
    property_id: str
    units: str = ""
    time: float | None = None
    object_id: int = 0
    value_type: ValueType = "scalar"

    def __post_init__(self) -> None:
        if not isinstance(self.property_id, str) or not self.property_id:
            raise TypeError(f"Property.property_id must be a non-empty string, "
                            f"got {self.property_id!r}")
        name = f"Property {self.property_id!r}"
        _check_value_type(self.value_type, "Property")
        _check_units(self.units, name)
        if self.time is not None and not is_finite_real(self.time):
            raise ValueError(f"{name}: time must be a finite number or None, got {self.time!r}")
        if not isinstance(self.object_id, int | np.integer) or isinstance(self.object_id, bool):
            raise TypeError(f"{name}: object_id must be an integer, got {self.object_id!r}")
        object.__setattr__(self, "value", _property_value(self.value, self.value_type, name))

    def getValue(self, time: float | None = None) -> Any:
        return self.value

    def getPropertyID(self) -> str:
        return self.property_id

    def getUnits(self) -> str:
        return self.units

    def getValueType(self) -> str:
        return self.value_type

    def getTime(self) -> float | None:
        return self.time

    def getObjectID(self) -> int:
        return self.object_id

    def to_wire(self) -> dict[str, Any]:
        return {"value": self.value, "property_id": self.property_id, "units": self.units,
                "time": self.time, "object_id": self.object_id, "value_type": self.value_type}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Property:
        data = dict(data)
        return cls(data.pop("value"), **data)


class Mesh:
    """Where a field's values live: a structured grid or an unstructured set of cells."""

    kind: ClassVar[str]
    dimension: int

    @property
    def point_shape(self) -> tuple[int, ...]:
        """The leading shape of vertex-located values."""
        raise NotImplementedError

    @property
    def cell_shape(self) -> tuple[int, ...]:
        """The leading shape of cell-located values."""
        raise NotImplementedError

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_wire(data: Mapping[str, Any]) -> Mesh:
        """Rebuild a mesh of either kind from :meth:`to_wire`."""
        data = dict(data)
        kind = data.pop("kind")
        if kind == "structured":
            return StructuredMesh(**data)
        if kind == "unstructured":
            return UnstructuredMesh(**data)
        raise ValueError(f"unknown mesh kind {kind!r}")


class StructuredMesh(Mesh):
    """A regular grid of ``shape`` vertices (1-3 axes) from ``origin`` with ``spacing``.

    Vertex values have the grid's shape, e.g. ``(nx, ny)``; cell values ``(nx-1, ny-1)``.
    """

    kind = "structured"

    def __init__(self, shape: Sequence[int], origin: Sequence[float] | None = None,
                 spacing: Sequence[float] | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dimension = len(self.shape)
        if not 1 <= self.dimension <= 3 or any(n < 2 for n in self.shape):
            raise ValueError(f"StructuredMesh.shape needs 1-3 axes of at least 2 vertices, "
                             f"got {tuple(shape)}")
        self.origin = tuple(float(x) for x in (origin or (0.0,) * self.dimension))
        self.spacing = tuple(float(x) for x in (spacing or (1.0,) * self.dimension))
        for name, values in (("origin", self.origin), ("spacing", self.spacing)):
            if len(values) != self.dimension:
                raise ValueError(f"StructuredMesh.{name} needs {self.dimension} values "
                                 f"(one per axis of shape {self.shape}), got {len(values)}")
        if any(h <= 0 for h in self.spacing):
            raise ValueError(f"StructuredMesh.spacing must be positive, got {self.spacing}")

    @property
    def point_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def cell_shape(self) -> tuple[int, ...]:
        return tuple(n - 1 for n in self.shape)

    def coordinates(self) -> list[np.ndarray]:
        """The vertex coordinates along each axis."""
        return [o + h * np.arange(n) for o, h, n in zip(self.origin, self.spacing, self.shape,
                                                        strict=True)]

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "origin": list(self.origin),
                "spacing": list(self.spacing)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredMesh) and self.to_wire() == other.to_wire()

    def __repr__(self) -> str:
        return f"StructuredMesh(shape={self.shape}, origin={self.origin}, spacing={self.spacing})"


class UnstructuredMesh(Mesh):
    """``vertices`` (n, 2 or 3) and ``cells``: VTK cell type name -> (m, vertices per cell)
    array of vertex indices, e.g. ``{"triangle": [[0, 1, 2]]}``."""

    kind = "unstructured"

    def __init__(self, vertices: Any, cells: Mapping[str, Any]) -> None:
        self.vertices = np.asarray(vertices, dtype=np.float64)
        if self.vertices.ndim != 2 or self.vertices.shape[1] not in (2, 3):
            raise ValueError(f"UnstructuredMesh.vertices must have shape (n, 2) or (n, 3), "
                             f"got {self.vertices.shape}")
        self.dimension = self.vertices.shape[1]
        self.cells: dict[str, np.ndarray] = {}
        for cell_type, connectivity in cells.items():
            if cell_type not in CELL_SIZES:
                raise ValueError(f"UnstructuredMesh.cells: unknown cell type {cell_type!r}; "
                                 f"known: {', '.join(CELL_SIZES)}")
            array = np.asarray(connectivity, dtype=np.int64)
            if array.ndim != 2 or array.shape[1] != CELL_SIZES[cell_type]:
                raise ValueError(f"UnstructuredMesh.cells[{cell_type!r}] must have shape "
                                 f"(m, {CELL_SIZES[cell_type]}), got {array.shape}")
            if array.size and (array.min() < 0 or array.max() >= len(self.vertices)):
                raise ValueError(f"UnstructuredMesh.cells[{cell_type!r}] refers to vertices "
                                 f"outside 0..{len(self.vertices) - 1}")
            self.cells[cell_type] = array

    @property
    def point_shape(self) -> tuple[int, ...]:
        return (len(self.vertices),)

    @property
    def cell_shape(self) -> tuple[int, ...]:
        return (sum(len(c) for c in self.cells.values()),)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "vertices": self.vertices, "cells": dict(self.cells)}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, UnstructuredMesh)
                and np.array_equal(self.vertices, other.vertices)
                and self.cells.keys() == other.cells.keys()
                and all(np.array_equal(self.cells[k], other.cells[k]) for k in self.cells))

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.cells.items())
        return f"UnstructuredMesh({len(self.vertices)} vertices, {counts or 'no cells'})"


@dataclass(eq=False)
class Field:
    """Values on a mesh, located at its vertices or cells.

    ``values`` has the mesh's ``point_shape`` (or ``cell_shape``) followed by the components:
    nothing for a scalar, ``(2 or 3,)`` for a vector, ``(d, d)`` with d 2 or 3 for a tensor.
    """

    mesh: Mesh
    values: np.ndarray
    field_id: str
    value_type: ValueType = "scalar"
    units: str = ""
    time: float | None = None
    location: Location = "vertex"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not FIELD_ID_PATTERN.fullmatch(self.field_id):
            raise ValueError(f"Field.field_id {self.field_id!r}: use 1-128 letters, digits, "
                             "'_', '.', '+' or '-'")
        _check_value_type(self.value_type, "Field")
        _check_units(self.units, f"Field {self.field_id!r}")
        if self.location not in ("vertex", "cell"):
            raise ValueError(f"Field.location must be 'vertex' or 'cell', got {self.location!r}")
        self.values = np.asarray(self.values)
        leading = self.mesh.point_shape if self.location == "vertex" else self.mesh.cell_shape
        shape = self.values.shape
        if shape[: len(leading)] != leading:
            raise ValueError(f"Field {self.field_id!r}: values of shape {shape} do not fit the "
                             f"{self.location} shape {leading} of {self.mesh!r}")
        components = shape[len(leading):]
        if components not in _COMPONENTS[self.value_type]:
            allowed = " or ".join(str(c) for c in _COMPONENTS[self.value_type])
            raise ValueError(f"Field {self.field_id!r}: a {self.value_type} field needs "
                             f"components of shape {allowed} after {leading}, got {components}")

    def getValues(self) -> np.ndarray:
        return self.values

    def getFieldID(self) -> str:
        return self.field_id

    def getMesh(self) -> Mesh:
        return self.mesh

    def with_values(self, values: np.ndarray, time: float | None = None) -> Field:
        """The same field description with new values (and time)."""
        return Field(self.mesh, values, self.field_id, self.value_type, self.units,
                     self.time if time is None else time, self.location, dict(self.metadata))

    def describe(self) -> dict[str, Any]:
        """Everything but the values and the mesh: what a FieldRef and a store keep."""
        return {"field_id": self.field_id, "value_type": self.value_type, "units": self.units,
                "time": self.time, "location": self.location, "metadata": self.metadata}

    def to_wire(self) -> dict[str, Any]:
        return {**self.describe(), "mesh": self.mesh.to_wire(), "values": self.values}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Field:
        data = dict(data)
        mesh = data.pop("mesh")
        return cls(mesh=mesh if isinstance(mesh, Mesh) else Mesh.from_wire(mesh), **data)


_PROPERTY_NDIM = {"scalar": 0, "vector": 1, "tensor": 2}


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)


def is_finite_real(value: object) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN: a valid time."""
    return _is_real(value) and math.isfinite(value)  # type: ignore[arg-type]


def _property_value(value: Any, value_type: str, name: str) -> Any:
    """A scalar stays a number; a vector becomes a 1-D, a tensor a 2-D numeric array."""
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{name}: the value must be numeric, got {type(value).__name__} "
                        f"{value!r:.60}")
    ndim = _PROPERTY_NDIM[value_type]
    if array.ndim != ndim or (ndim and 0 in array.shape):
        wanted = {0: "a single number", 1: "a non-empty 1-D array",
                  2: "a non-empty 2-D array"}[ndim]
        hint = {0: "scalar", 1: "vector", 2: "tensor"}.get(array.ndim)
        suffix = f"; pass value_type={hint!r}" if hint and hint != value_type else ""
        raise ValueError(f"{name}: a {value_type} value must be {wanted}, got shape "
                         f"{array.shape}{suffix}")
    return array.item() if ndim == 0 else array


def _check_units(units: object, owner: str) -> None:
    if not isinstance(units, str):
        raise TypeError(f"{owner}: units must be a string such as 'K' or 'kg/m**3', got "
                        f"{type(units).__name__} {units!r}")


def _check_value_type(value_type: str, owner: str) -> None:
    if value_type not in ("scalar", "vector", "tensor"):
        raise ValueError(f"{owner}.value_type must be 'scalar', 'vector' or 'tensor', "
                         f"got {value_type!r}")
