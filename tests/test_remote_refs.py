"""FieldRefs inside a coupling session, on the local backend: a consumer reads only refs that
name an application of its session and the store that application serves; never a URL, a
directory of the ref's choosing, nor a file a symbolic link leads to. (Reads between hosts
that share nothing: test_multihost.py.)"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from gridcouple.appkit.store import FieldRef, FieldStore, RefRefusedError
from gridcouple.appkit.transport import RemoteError
from gridcouple.config import load_config
from gridcouple.coupler import AppRequest, Coupler
from test_multihost_apps import CHUNK_ROWS, values

TESTS = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A coupler on the local backend with a Producer and a Consumer, and one ref."""
    directory = tmp_path_factory.mktemp("remote-refs")
    path = directory / "gridcouple.toml"
    path.write_text(f'state_dir = "{directory / "state"}"\n[backend.local]\nslots = 4\n'
                    'idle_exit = 2\n[coupler]\njoin_timeout = 60\n')
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, previous or ""])
    try:
        with Coupler(load_config(path)) as coupler:
            producer, consumer = coupler.allocate_many([
                AppRequest("test_multihost_apps:Producer", name="producer"),
                AppRequest("test_multihost_apps:Consumer", name="consumer")])
            ref = producer.get_field("temperature", 0.5, mode="ref")
            yield coupler, producer, consumer, ref
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def refused(consumer, ref: FieldRef) -> str:
    """The consumer's refusal of ``ref`` (a RemoteError of type RefRefusedError)."""
    with pytest.raises(RemoteError) as failure:
        consumer.read_all(ref)
    assert failure.value.remote_type == "RefRefusedError", failure.value
    return failure.value.message


def test_a_ref_of_the_session_is_read_from_the_store_this_host_sees(session):
    coupler, producer, consumer, ref = session
    assert ref.producer == "producer" and ref.store_url == coupler.where("producer").store
    assert ref.store_id == coupler.where("producer").store_id
    assert consumer.read_all(ref) == values().sum()
    assert consumer.read_rows(ref, 8, 16) == values()[8:16].sum()
    np.testing.assert_array_equal(ref.read(), values())  # and in the coupler's process
    assert producer.served()["requests"] == 0  # same host: the files, not the server


def test_an_ftp_url_is_refused(session):
    *_, consumer, ref = session
    message = refused(consumer, dataclasses.replace(ref, store_url="ftp://127.0.0.1/fields"))
    assert "refusing a FieldRef into 'ftp://127.0.0.1/fields': producer serves the store" \
        in message


def test_an_http_url_is_refused(session):
    *_, consumer, ref = session
    message = refused(consumer, dataclasses.replace(ref, store_url="http://127.0.0.1:1/x"))
    assert "refusing a FieldRef into 'http://127.0.0.1:1/x'" in message


def test_a_local_directory_that_is_not_the_producers_store_is_refused(session, tmp_path):
    _, producer, consumer, ref = session
    elsewhere = FieldStore(tmp_path / "elsewhere", producer="producer")
    planted = elsewhere.put(producer.get_field("temperature", 0.5))
    assert planted.read().sum() == values().sum()  # a readable store of the same shape
    message = refused(consumer, FieldRef.from_wire(planted.to_wire()))
    assert f"refusing a FieldRef into {str(tmp_path / 'elsewhere')!r}" in message
    assert refused(consumer, dataclasses.replace(ref, store_url="/etc"))


def test_a_symlinked_chunk_is_refused(session):
    _, producer, consumer, _ = session
    ref = producer.get_field("temperature", 0.75, mode="ref")
    assert consumer.read_rows(ref, 0, CHUNK_ROWS) == values()[:CHUNK_ROWS].sum()
    planted = producer.plant_symlink(ref, 3, "/etc/passwd")
    message = refused(consumer, ref)
    assert f"{ref.array_path}/c/3/0 in the store" in message and "symbolic link" in message
    assert consumer.read_rows(ref, 0, CHUNK_ROWS) > 0  # the other chunks are still read
    with pytest.raises(RemoteError, match="symbolic link"):
        consumer.read_rows(ref, 3 * CHUNK_ROWS, 4 * CHUNK_ROWS)
    with pytest.raises(RefRefusedError, match="symbolic link"):  # in the coupler too
        ref.read()
    assert os.path.islink(planted)


def test_a_ref_naming_no_producer_or_a_stranger_or_another_store_is_refused(session):
    *_, consumer, ref = session
    assert "names no producer" in refused(consumer, dataclasses.replace(ref, producer=""))
    assert "from 'stranger', which is not an application of this coupling session" in \
        refused(consumer, dataclasses.replace(ref, producer="stranger"))
    assert "store identity" in refused(consumer, dataclasses.replace(ref, store_id="0" * 32))

