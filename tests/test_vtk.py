"""VTK export, read back with an independent reader (meshio) and compared value by value."""

from __future__ import annotations

import meshio
import numpy as np
import pytest

from gridcouple.appkit.data import Field, StructuredMesh, UnstructuredMesh
from gridcouple.appkit.vtk import write_vtk

RTOL = 1e-6  # pyvtk writes "float" (single precision) data


def written(path, fields: list[Field], dataset: str) -> meshio.Mesh:
    """Write ``fields``, check the file's DATASET line (what ParaView opens it as) and read it
    back with meshio."""
    write_vtk(path, fields)
    assert next(line.split()[1] for line in path.read_text().splitlines()
                if line.startswith("DATASET")) == dataset
    return meshio.read(path)


def at_points(read, mesh: StructuredMesh, values: np.ndarray) -> np.ndarray:
    """``values`` (on the grid's vertices) in the order of the points meshio read, found from
    each point's coordinates: independent of how the writer orders them."""
    coordinates = read.points[:, : mesh.dimension]
    index = np.rint((coordinates - mesh.origin) / mesh.spacing).astype(int)
    np.testing.assert_allclose(coordinates, mesh.origin + index * np.array(mesh.spacing),
                               atol=1e-9)
    return values[tuple(index.T)]


@pytest.mark.parametrize("mesh", [
    StructuredMesh((4, 3), origin=(1.0, 2.0), spacing=(0.5, 0.25)),
    StructuredMesh((3, 4, 2), origin=(0.5, -1.0, 2.0), spacing=(0.25, 0.5, 1.5)),
], ids=["2-D", "3-D"])
def test_structured_points_with_scalars_vectors_and_tensors(tmp_path, mesh):
    rng = np.random.default_rng(2)
    d = mesh.dimension
    temperature = rng.random(mesh.shape)
    velocity = rng.random((*mesh.shape, d))
    stress = rng.random((*mesh.shape, d, d))
    read = written(tmp_path / "grid.vtk", [
        Field(mesh, temperature, "temperature"),
        Field(mesh, velocity, "velocity", value_type="vector"),
        Field(mesh, stress, "stress", value_type="tensor")], "STRUCTURED_POINTS")
    assert len(read.points) == temperature.size
    np.testing.assert_allclose(read.point_data["temperature"].reshape(-1),
                               at_points(read, mesh, temperature), rtol=RTOL)
    vectors = read.point_data["velocity"]
    np.testing.assert_allclose(vectors[:, :d], at_points(read, mesh, velocity), rtol=RTOL)
    assert np.all(vectors[:, d:] == 0)  # a 2-D vector is padded to 3 components
    tensors = read.point_data["stress"].reshape(-1, 3, 3)
    np.testing.assert_allclose(tensors[:, :d, :d], at_points(read, mesh, stress), rtol=RTOL)
    assert np.all(tensors[:, d:, :] == 0) and np.all(tensors[:, :, d:] == 0)


def test_a_structured_mesh_with_cell_data_becomes_an_unstructured_grid_of_quads(tmp_path):
    mesh = StructuredMesh((4, 3), origin=(1.0, 2.0), spacing=(0.5, 0.25))
    rng = np.random.default_rng(1)
    temperature = rng.random((4, 3))
    displacement = rng.random((4, 3, 2))
    heat = rng.random((3, 2))
    # pyvtk's STRUCTURED_POINTS carries no cell data: the cells are spelled out.
    read = written(tmp_path / "step.vtk", [
        Field(mesh, temperature, "temperature"),
        Field(mesh, displacement, "displacement", value_type="vector"),
        Field(mesh, heat, "heat", location="cell")], "UNSTRUCTURED_GRID")
    # VTK numbers points x fastest: point (i, j) is i + 4 * j.
    x, y = np.meshgrid(1.0 + 0.5 * np.arange(4), 2.0 + 0.25 * np.arange(3), indexing="ij")
    np.testing.assert_allclose(read.points[:, 0], x.reshape(-1, order="F"))
    np.testing.assert_allclose(read.points[:, 1], y.reshape(-1, order="F"))
    np.testing.assert_allclose(read.point_data["temperature"].reshape(-1),
                               temperature.reshape(-1, order="F"), rtol=RTOL)
    vectors = read.point_data["displacement"]
    np.testing.assert_allclose(vectors[:, :2], displacement.transpose(1, 0, 2).reshape(-1, 2),
                               rtol=RTOL)
    assert np.all(vectors[:, 2] == 0)
    assert [block.type for block in read.cells] == ["quad"]
    np.testing.assert_allclose(read.cell_data["heat"][0].reshape(-1),
                               heat.reshape(-1, order="F"), rtol=RTOL)
    first_cell = read.points[read.cells[0].data[0]]
    np.testing.assert_allclose(first_cell[:, :2].mean(axis=0), [1.25, 2.125])


def test_unstructured_grid_with_mixed_cells_and_tensors(tmp_path):
    mesh = UnstructuredMesh([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0]],
                            {"quad": [[0, 1, 3, 2]], "triangle": [[1, 4, 3]]})
    stress = np.arange(20.0).reshape(5, 2, 2)
    read = written(tmp_path / "mesh.vtk", [
        Field(mesh, stress, "stress", value_type="tensor"),
        Field(mesh, np.array([10.0, 20.0]), "damage", location="cell")], "UNSTRUCTURED_GRID")
    cells = {block.type: block.data.tolist() for block in read.cells}
    assert cells == {"quad": [[0, 1, 3, 2]], "triangle": [[1, 4, 3]]}
    np.testing.assert_allclose(read.point_data["stress"][:, :2, :2], stress, rtol=RTOL)
    # pyvtk writes triangles before quads; the cell values follow their cells.
    by_type = {block.type: data.reshape(-1)[0]
               for block, data in zip(read.cells, read.cell_data["damage"], strict=True)}
    assert by_type == {"quad": 10.0, "triangle": 20.0}


def test_fields_on_different_meshes_are_refused(tmp_path):
    a, b = StructuredMesh((2, 2)), StructuredMesh((3, 2))
    with pytest.raises(ValueError, match="'b' is on another mesh than 'a'"):
        write_vtk(tmp_path / "x.vtk", [Field(a, np.zeros((2, 2)), "a"),
                                       Field(b, np.zeros((3, 2)), "b")])
