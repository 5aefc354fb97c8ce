"""The Application base class: MuPIF's application interface in Python names.

An application author subclasses :class:`Application` and overrides what the code offers::

    class Heat(Application):
        def initialize(self, **options): ...
        def solve_step(self, tstep): ...
        def get_field(self, field_id, time): return Field(...)
        def get_critical_time_step(self): return 0.1

Callers may pass ``mode="copy"`` or ``mode="ref"`` to ``get_field`` whatever the author wrote:
with ``"ref"`` the base class writes the field once into the application's FieldStore and
returns a small :class:`~gridcouple.appkit.store.FieldRef` (a field without a time is stored
at the time asked for). ``set_field`` receives a Field; a FieldRef passed to it is read from
its store first (into the buffer of the previous call when the class sets
``reuse_field_buffers = True``), unless the class sets ``accepts_field_refs = True`` to read
only the chunks it needs itself.

MuPIF's camelCase names (``solveStep``, ``getField``, ``getCriticalTimeStep``, ...) work as
aliases both ways: a class ported from MuPIF that defines ``getField`` answers ``get_field``.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from typing import Any, ClassVar, Literal

import numpy as np

from gridcouple.appkit.data import Field, Property, TimeStep
from gridcouple.appkit.store import FieldRef, FieldStore, new_scratch_root

FIELD_STORE_ENV = "GRIDCOUPLE_FIELD_STORE"
#: The name the application server serves its application under: the producer its field
#: store's refs name (set by gridcouple.appkit.server before it creates the application).
store_producer = ""

# Python name -> MuPIF name. Both names exist on every Application.
MUPIF_NAMES: dict[str, str] = {
    "initialize": "initialize",
    "solve_step": "solveStep",
    "finish_step": "finishStep",
    "get_critical_time_step": "getCriticalTimeStep",
    "get_field": "getField",
    "set_field": "setField",
    "get_property": "getProperty",
    "set_property": "setProperty",
    "get_application_signature": "getApplicationSignature",
    "get_api_version": "getAPIVersion",
    "is_solved": "isSolved",
    "terminate": "terminate",
}


class Application:
    """One simulation code behind MuPIF's interface. Override what your code offers."""

    accepts_field_refs: ClassVar[bool] = False
    # True: a FieldRef given to set_field is read into the array the previous one of that
    # field id was read into (same shape and dtype), not into a new one each step. What
    # set_field kept of the previous values is overwritten then: copy what must outlive a step.
    reuse_field_buffers: ClassVar[bool] = False
    # Class-level defaults, so a subclass need not call Application.__init__.
    _background: threading.Thread | None = None
    _background_error: BaseException | None = None
    _field_store: FieldStore | None = None
    _field_store_scratch: str | None = None  # a directory the store property made
    _field_buffers: dict[str, np.ndarray] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for python_name, mupif_name in MUPIF_NAMES.items():
            if python_name != mupif_name and mupif_name in cls.__dict__ \
                    and python_name not in cls.__dict__:
                # Ported from MuPIF: the author's method becomes the Python name, and the
                # MuPIF name the base class's alias of it (so it gains mode=, background...).
                setattr(cls, python_name, cls.__dict__[mupif_name])
                setattr(cls, mupif_name, getattr(Application, mupif_name))
        if "get_field" in cls.__dict__:
            cls.get_field = _with_field_mode(cls.__dict__["get_field"])  # type: ignore[method-assign]
        if "set_field" in cls.__dict__ and not cls.accepts_field_refs:
            cls.set_field = _reading_refs(cls.__dict__["set_field"])  # type: ignore[method-assign]

    # --- the interface -------------------------------------------------------------------

    def initialize(self, **options: Any) -> None:
        """Prepare the code to run (files, parameters, working directory)."""

    def solve_step(self, tstep: TimeStep) -> None:
        """Advance the solution to ``tstep.time``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement solve_step")

    def finish_step(self, tstep: TimeStep) -> None:
        """Called once the step is accepted (after all couplings converged)."""

    def get_critical_time_step(self) -> float:
        """The largest stable time step."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement get_critical_time_step")

    def get_field(self, field_id: str, time: float,
                  mode: Literal["copy", "ref"] = "copy") -> Field | FieldRef:
        """The field ``field_id`` at ``time``: the values (copy) or a FieldRef (ref)."""
        raise NotImplementedError(f"{type(self).__name__} does not provide fields")

    def set_field(self, field: Field) -> None:
        """Take a field computed elsewhere (a FieldRef is read before it gets here)."""
        raise NotImplementedError(f"{type(self).__name__} does not accept fields")

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        """The property ``property_id`` at ``time``."""
        raise NotImplementedError(f"{type(self).__name__} does not provide properties")

    def set_property(self, prop: Property) -> None:
        """Take a property computed elsewhere."""
        raise NotImplementedError(f"{type(self).__name__} does not accept properties")

    def get_application_signature(self) -> str:
        """One line naming the application."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def get_api_version(self) -> int:
        """The version of this interface (MuPIF's getAPIVersion)."""
        return 1

    def terminate(self) -> None:
        """Release what the code holds; the server exits after this returns."""

    # --- stepping in the background ----------------------------------------------------

    def solve_step_in_background(self, tstep: TimeStep) -> None:
        """Start ``solve_step(tstep)`` in a thread and return at once; :meth:`wait` for it."""
        if self._background is not None and self._background.is_alive():
            raise RuntimeError(f"{type(self).__name__}: a step is already running in the "
                               "background; wait() for it first")
        self._background_error = None

        def run() -> None:
            try:
                self.solve_step(tstep)
            except BaseException as exc:  # handed to wait()
                self._background_error = exc

        self._background = threading.Thread(target=run, name="solve_step", daemon=True)
        self._background.start()

    def wait(self) -> None:
        """Wait for the background step; re-raise what it raised."""
        if self._background is not None:
            self._background.join()
            self._background = None
        error, self._background_error = self._background_error, None
        if error is not None:
            raise error

    def is_solved(self) -> bool:
        """True unless a background step is still running."""
        return self._background is None or not self._background.is_alive()

    # --- MuPIF's names ----------------------------------------------------------------------

    def solveStep(self, tstep: TimeStep, stageID: int = 0,
                  runInBackground: bool = False) -> None:
        if runInBackground:
            self.solve_step_in_background(tstep)
        else:
            self.solve_step(tstep)

    def finishStep(self, tstep: TimeStep) -> None:
        self.finish_step(tstep)

    def getCriticalTimeStep(self) -> float:
        return self.get_critical_time_step()

    def getField(self, fieldID: str, time: float, objectID: int = 0,
                 mode: Literal["copy", "ref"] = "copy") -> Field | FieldRef:
        return self.get_field(fieldID, time, mode=mode)

    def setField(self, field: Field | FieldRef, objectID: int = 0) -> None:
        self.set_field(field)  # type: ignore[arg-type]

    def getProperty(self, propID: str, time: float | None = None,
                    objectID: int = 0) -> Property:
        return self.get_property(propID, time)

    def setProperty(self, property: Property, objectID: int = 0) -> None:
        self.set_property(property)

    def getApplicationSignature(self) -> str:
        return self.get_application_signature()

    def getAPIVersion(self) -> int:
        return self.get_api_version()

    def isSolved(self) -> bool:
        return self.is_solved()

    # --- fields by reference ------------------------------------------------------------

    @property
    def field_store(self) -> FieldStore:
        """Where ``get_field(..., mode="ref")`` writes: ``$GRIDCOUPLE_FIELD_STORE``, else a
        fresh directory (in /dev/shm when there is one), which the application server removes
        when it ends."""
        if self._field_store is None:
            url = os.environ.get(FIELD_STORE_ENV)
            if not url:
                base = "/dev/shm" if os.path.isdir("/dev/shm") else None
                url = self._field_store_scratch = new_scratch_root(base)
            self._field_store = FieldStore(url, producer=store_producer)
        return self._field_store

    @field_store.setter
    def field_store(self, store: FieldStore) -> None:
        self._field_store = store

    def export_field(self, field: Field, mode: Literal["copy", "ref"],
                     time: float | None = None) -> Field | FieldRef:
        """``field`` itself for ``"copy"``; for ``"ref"`` its version in the field store at
        ``field.time`` (at ``time`` when the field has none)."""
        if mode == "copy":
            return field
        if mode == "ref":
            if field.time is None and time is not None:
                field = field.with_values(field.values, time)
            return self.field_store.put(field)
        raise ValueError(f"get_field mode must be 'copy' or 'ref', got {mode!r}")

    def _read_ref(self, ref: FieldRef) -> Field:
        """``ref`` read into a Field, into the previous buffer of its field id when the class
        sets ``reuse_field_buffers`` (and shape and dtype still fit)."""
        if not self.reuse_field_buffers:
            return ref.to_field()
        if self._field_buffers is None:
            self._field_buffers = {}
        buffer = self._field_buffers.get(ref.field_id)
        if buffer is None or buffer.shape != ref.shape or buffer.dtype != np.dtype(ref.dtype):
            buffer = self._field_buffers[ref.field_id] = np.empty(ref.shape, ref.dtype)
        return ref.to_field(out=buffer)


def _with_field_mode(method: Any) -> Any:
    """Give an author's ``get_field(field_id, time)`` the ``mode`` argument."""
    if "mode" in inspect.signature(method).parameters:
        return method

    @functools.wraps(method)
    def get_field(self: Application, field_id: str, time: float, *args: Any,
                  mode: Literal["copy", "ref"] = "copy", **kwargs: Any) -> Field | FieldRef:
        return self.export_field(method(self, field_id, time, *args, **kwargs), mode, time)

    return get_field


def _reading_refs(method: Any) -> Any:
    """Let an author's ``set_field(field)`` receive FieldRefs as Fields."""

    @functools.wraps(method)
    def set_field(self: Application, field: Field | FieldRef, *args: Any, **kwargs: Any) -> Any:
        if isinstance(field, FieldRef):
            field = self._read_ref(field)
        return method(self, field, *args, **kwargs)

    return set_field
