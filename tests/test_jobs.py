"""The job model: specs, resources, states, and the parsers users type values into."""

from __future__ import annotations

import pytest

from gridcouple.jobs import (
    JobSpec,
    JobState,
    JobStatus,
    Resources,
    StagedFile,
    format_duration,
    parse_duration,
    parse_memory,
)


def test_states_have_order_and_finality():
    finals = {s for s in JobState if s.is_final}
    assert finals == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELED, JobState.TIMEOUT}
    assert JobState.NEW.order < JobState.QUEUED.order == JobState.HELD.order
    assert JobState.QUEUED.order < JobState.ACTIVE.order < JobState.COMPLETED.order


def test_spec_round_trips_through_a_dict():
    spec = JobSpec(argv=("python", "-c", "print(1)"), name="calc",
                   environment={"A": "1"}, resources=Resources(cpus=4, memory_mb=2048,
                                                               walltime=60.0),
                   stage_in=(StagedFile("in.dat", "data/in.dat"),),
                   stage_out=(StagedFile("out.dat", "out.dat"),),
                   attributes={"slurm.partition": "debug"}, estimate=30.0)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.attributes_for("slurm") == {"partition": "debug"}
    assert spec.attributes_for("htcondor") == {}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of argv or script"),
    ({"argv": ("a",), "script": "b"}, "exactly one of argv or script"),
    ({"argv": ("a",), "name": "has space"}, "JobSpec.name"),
    ({"argv": ("a",), "attributes": {"partition": "x"}}, "'<backend>.<name>'"),
    ({"argv": ("a",), "estimate": -1}, "estimate must not be negative"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JobSpec(**kwargs)


@pytest.mark.parametrize("kwargs", [{"cpus": 0}, {"nodes": 0}, {"gpus": -1},
                                    {"memory_mb": 0}, {"walltime": 0}])
def test_bad_resources_are_refused(kwargs):
    with pytest.raises(ValueError, match="Resources"):
        Resources(**kwargs)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), (45, 45),
    ("10", 600), ("1:30", 90), ("1:00:00", 3600), ("2-0", 172800),
    ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_durations_in_slurm_and_short_forms(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration_and_memory_say_what_is_accepted():
    with pytest.raises(ValueError, match="Slurm's"):
        parse_duration("soon")
    with pytest.raises(ValueError, match="K, M, G or T"):
        parse_memory("lots")


@pytest.mark.parametrize(("text", "mib"), [("512", 512), ("512M", 512), ("4G", 4096),
                                           ("4GB", 4096), ("1.5G", 1536), ("1T", 1048576),
                                           ("2048K", 2)])
def test_memory(text, mib):
    assert parse_memory(text) == mib


def test_format_duration():
    assert format_duration(59.2) == "00:01:00"
    assert format_duration(93784) == "1-02:03:04"


def test_describe_keeps_native_words():
    status = JobStatus(JobState.QUEUED, native_state="PENDING", reason="Resources")
    assert status.describe() == "QUEUED: PENDING (Resources)"
    assert JobStatus(JobState.FAILED, exit_code=3).describe() == "FAILED [exit code 3]"
    assert JobStatus(JobState.FAILED, signal=9).describe() == "FAILED [killed by SIGKILL]"
