"""VTK export of fields with pyvtk: legacy ``.vtk`` files that ParaView opens.

A structured mesh becomes STRUCTURED_POINTS (UNSTRUCTURED_GRID of quads or hexahedra when a
field lives on its cells), an unstructured one UNSTRUCTURED_GRID; each field
goes in as point data (vertex fields) or cell data (cell fields): scalars, vectors (2-D vectors
padded to 3 components) or tensors (2x2 padded to 3x3). All fields must share one mesh.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyvtk
import pyvtk.common

from gridcouple.appkit.data import Field, Mesh, StructuredMesh, UnstructuredMesh


def _is_number(obj: object) -> bool:
    return isinstance(obj, int | float | np.integer | np.floating)


def _tensors_to_string(self: Any, format: str = "ascii") -> bytes:
    datatype = self.get_datatype(self.tensors)
    return b"\n".join([f"TENSORS {self.name} {datatype}".encode(),
                        self.seq_to_string(self.tensors, format, datatype)])


# Two pyvtk 0.5.18 bugs, mended here: it checks numbers against np.float_, which numpy 2
# removed, and its TENSORS section joins str with bytes (Python 2 code).
pyvtk.common.is_number = _is_number
pyvtk.Tensors.to_string = _tensors_to_string

# pyvtk writes cells grouped by type in this order; cell values are reordered to match.
_PYVTK_CELL_ORDER = list(pyvtk.UnstructuredGrid._vtk_cell_types_map)


def write_vtk(path: str | os.PathLike[str], fields: Sequence[Field], *,
              title: str = "gridcouple") -> Path:
    """Write ``fields`` (on one mesh) to a legacy ASCII VTK file; returns the path.

    ASCII because pyvtk's binary VECTORS sections lack the line end other readers expect.
    Values and points are single precision, as the sections' ``float`` type says: each
    number is written with the fewest digits that give back its float32 value.
    """
    if not fields:
        raise ValueError("write_vtk needs at least one field")
    mesh = fields[0].mesh
    for field in fields[1:]:
        if field.mesh != mesh:
            raise ValueError(f"write_vtk: field {field.field_id!r} is on another mesh than "
                             f"{fields[0].field_id!r}; write one file per mesh")
    point_data = [_attribute(f, mesh) for f in fields if f.location == "vertex"]
    cell_data = [_attribute(f, mesh) for f in fields if f.location == "cell"]
    parts: list[Any] = [_dataset(mesh, with_cells=bool(cell_data))]
    if point_data:
        parts.append(pyvtk.PointData(*point_data))
    if cell_data:
        parts.append(pyvtk.CellData(*cell_data))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pyvtk.VtkData(*parts, title[:255]).tofile(str(target), "ascii")
    return target


def _dataset(mesh: Mesh, *, with_cells: bool) -> Any:
    if isinstance(mesh, StructuredMesh):
        if with_cells:  # pyvtk's STRUCTURED_POINTS carries no cell data: spell the cells out
            return _dataset(_cells_of(mesh), with_cells=True)
        pad = 3 - mesh.dimension
        return pyvtk.StructuredPoints(list(mesh.shape) + [1] * pad,
                                      list(mesh.origin) + [0.0] * pad,
                                      list(mesh.spacing) + [1.0] * pad)
    assert isinstance(mesh, UnstructuredMesh)
    points = np.zeros((len(mesh.vertices), 3))
    points[:, : mesh.dimension] = mesh.vertices
    cells = {name: mesh.cells[name].tolist() for name in _PYVTK_CELL_ORDER
             if name in mesh.cells}
    return pyvtk.UnstructuredGrid(_single(points), **cells)


def _cells_of(mesh: StructuredMesh) -> UnstructuredMesh:
    """A structured grid as lines, quads or hexahedra, points and cells numbered x fastest
    (VTK's order, as in STRUCTURED_POINTS)."""
    coordinates = np.meshgrid(*mesh.coordinates(), indexing="ij")
    points = np.stack([_x_fastest(c) for c in coordinates], axis=-1)
    ids = _x_fastest(np.arange(points.shape[0]).reshape(mesh.shape, order="F"))
    ids = ids.reshape(mesh.shape, order="F")
    corner = [ids[tuple(slice(o, n - 1 + o) for o, n in zip(offset, mesh.shape, strict=True))]
              for offset in _CORNERS[mesh.dimension]]
    cells = np.stack([_x_fastest(c) for c in corner], axis=-1)
    name = {1: "line", 2: "quad", 3: "hexahedron"}[mesh.dimension]
    return UnstructuredMesh(points, {name: cells})


# The corners of a line, quad and hexahedron in VTK's vertex order, as index offsets.
_CORNERS: dict[int, list[tuple[int, ...]]] = {
    1: [(0,), (1,)],
    2: [(0, 0), (1, 0), (1, 1), (0, 1)],
    3: [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)],
}


def _x_fastest(grid: np.ndarray) -> np.ndarray:
    """A grid's values flattened with the first axis running fastest."""
    return grid.reshape(-1, order="F")


def _vtk_order(field: Field, mesh: Mesh) -> np.ndarray:
    """The values as (n, components...) in the order VTK numbers points or cells."""
    values = field.values
    if isinstance(mesh, StructuredMesh):
        axes = mesh.dimension
        # VTK runs x fastest: reverse the grid axes, then flatten them.
        grid = values.reshape(*values.shape[:axes], -1)
        flat = np.transpose(grid, (*reversed(range(axes)), axes)).reshape(-1, grid.shape[-1])
        return flat.reshape(-1, *values.shape[axes:])
    assert isinstance(mesh, UnstructuredMesh)
    if field.location == "vertex":
        return values
    offsets, start = {}, 0
    for name, cells in mesh.cells.items():
        offsets[name] = (start, start + len(cells))
        start += len(cells)
    order = [values[slice(*offsets[name])] for name in _PYVTK_CELL_ORDER if name in offsets]
    return np.concatenate(order) if order else values


def _single(values: np.ndarray) -> list[Any]:
    """Nested lists of float32 numbers: pyvtk writes each as ``str()`` does, and numpy's
    ``str`` of a float32 is its shortest exact form (``0.1``, not ``0.10000000149011612``)."""
    single = np.asarray(values, dtype=np.float32)
    if single.ndim == 1:
        return list(single)
    return [_single(part) for part in single]


def _attribute(field: Field, mesh: Mesh) -> Any:
    values = _vtk_order(field, mesh).astype(np.float64)
    kind: Literal["scalar", "vector", "tensor"] = field.value_type  # type: ignore[assignment]
    if kind == "scalar":
        return pyvtk.Scalars(_single(values.reshape(-1)), name=field.field_id,
                             lookup_table="default")
    if kind == "vector":
        padded = np.zeros((len(values), 3))
        padded[:, : values.shape[1]] = values
        return pyvtk.Vectors(_single(padded), name=field.field_id)
    padded = np.zeros((len(values), 3, 3))
    size = values.shape[1]
    padded[:, :size, :size] = values
    return pyvtk.Tensors(_single(padded), name=field.field_id)
