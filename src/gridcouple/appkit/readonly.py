"""Any :class:`~gridcouple.appkit.store.StoreReader` as a read-only zarr v3 store.

``FieldRef.open()``, ``to_dask()`` and ``open_dataset()`` open their array through this: zarr
asks for the keys it needs (the array's ``zarr.json``, then one key per chunk it reads), and
the reader fetches exactly those, from a confined local directory or through the producer's
application server. Importing this module imports zarr.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype


class ReaderStore(Store):
    """A read-only zarr store over a StoreReader (``get``, ``list_dir``)."""

    def __init__(self, reader: Any) -> None:
        super().__init__(read_only=True)
        self.reader = reader

    def __repr__(self) -> str:
        return f"ReaderStore({self.reader!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReaderStore) and other.reader is self.reader

    def __hash__(self) -> int:
        return id(self.reader)

    @property
    def supports_writes(self) -> bool:
        return False

    @property
    def supports_deletes(self) -> bool:
        return False

    @property
    def supports_listing(self) -> bool:
        return True

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        start = end = suffix = None
        if isinstance(byte_range, RangeByteRequest):
            start, end = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start = byte_range.offset
        elif isinstance(byte_range, SuffixByteRequest):
            suffix = byte_range.suffix
        elif byte_range is not None:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        data = await asyncio.to_thread(self.reader.get, key, start, end, suffix)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]],
                                 ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range)
                                           for key, byte_range in key_ranges)))

    async def exists(self, key: str) -> bool:
        if key.endswith("zarr.json") or "/c/" in f"/{key}":
            return await asyncio.to_thread(self.reader.get, key, 0, 0) is not None
        parent, _, name = key.rpartition("/")
        return name in await asyncio.to_thread(self.reader.list_dir, parent)

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:  # type: ignore[override]
        async for key in self.list_prefix(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        pending = [prefix.rstrip("/")]
        while pending:
            directory = pending.pop()
            for name in await asyncio.to_thread(self.reader.list_dir, directory):
                key = f"{directory}/{name}" if directory else name
                if name != "zarr.json" and await asyncio.to_thread(self.reader.list_dir, key):
                    pending.append(key)  # a directory with something in it
                else:
                    yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        for name in await asyncio.to_thread(self.reader.list_dir, prefix.rstrip("/")):
            yield name
