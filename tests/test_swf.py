"""SWF traces: reading, replay rules with their counts, writing the simulated schedule, the
``gridcouple simulate`` command, and the real traces from GRIDCOUPLE_TRACES."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gridcouple.cli import app, jobs, main, simulate  # noqa: F401  (registers the commands, as main does)
from gridcouple.scheduler.engine import Machine, Simulator
from gridcouple.scheduler.engine import simulate as run_simulation
from gridcouple.scheduler.metrics import simulator_metrics
from gridcouple.scheduler.policies import make_policy
from gridcouple.scheduler.swf import (
    COLUMN,
    ReplayOptions,
    SwfError,
    read_swf,
    replay_jobs,
    schedule_records,
    write_swf,
)

HEADER = """; Version: 2.2
; Computer: Test machine
; MaxProcs: 8
; MaxNodes: 4
; a comment without a key
"""
#           job submit wait run alloc cpu mem reqp reqt reqm status user group exe q part prec think
ROWS = """    1     0   5   10    2   -1  -1    2   20   -1   1  1 1 -1 1 -1 -1 -1
    2     5   0   30   -1   -1  -1    4   -1   -1   1  2 1 -1 1 -1 -1 -1
    3     6   0    0    1   -1  -1    1   10   -1   5  1 1 -1 1 -1 -1 -1
    4     7   0   40    3   -1  -1   -1   30   -1   5  3 1 -1 1 -1 -1 -1
    5     8   0    5   16   -1  -1   16   10   -1   1  1 1 -1 1 -1 -1 -1
    6     9   0   -1   -1   -1  -1   -1   10   -1   0  1 1 -1 1 -1 -1 -1
"""


@pytest.fixture
def trace_file(tmp_path) -> Path:
    path = tmp_path / "small.swf.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(HEADER + ROWS)
    return path


def test_read_header_and_records(trace_file):
    trace = read_swf(trace_file)
    assert trace.header_value("computer") == "Test machine"
    assert trace.max_procs == 8
    assert ("", "a comment without a key") in trace.header
    assert trace.records.shape == (6, 18)
    assert trace.records[1, COLUMN["requested_procs"]] == 4
    assert trace.lines.tolist() == [6, 7, 8, 9, 10, 11]


def test_default_replay_rules_and_counts(trace_file):
    replay = replay_jobs(read_swf(trace_file))
    assert replay.procs == 8
    # job 3 never ran, job 5 is wider than 8, job 6 has neither procs nor a run time
    assert [job.payload for job in replay.jobs] == [0, 1, 3]
    assert [(j.procs, j.estimate, j.work) for j in replay.jobs] == [(2, 20, 10), (4, 30, 30),
                                                                     (3, 30, 40)]
    assert replay.jobs[1].limit == float("inf")  # no requested time: no walltime to kill at
    assert replay.counts == {
        "records": 6, "dropped: no procs given": 1, "drop: run time <= 0": 1,
        "keep: cancelled (status 5)": 1, "drop: wider than 8 procs": 1,
        "procs from allocated": 1, "estimate from run time": 1, "run time > estimate": 1,
        "jobs replayed": 3,
    }


def test_other_replay_choices(trace_file):
    trace = read_swf(trace_file)
    options = ReplayOptions(procs="allocated", estimate="runtime", nonpositive_runtime="keep",
                            cancelled="drop", too_wide="clip")
    replay = replay_jobs(trace, 8, options)
    assert [job.payload for job in replay.jobs] == [0, 1, 4]
    assert [(j.procs, j.estimate) for j in replay.jobs] == [(2, 10), (4, 30), (8, 5)]
    assert replay.counts["clip: wider than 8 procs"] == 1
    assert replay.counts["drop: cancelled (status 5)"] == 2
    assert replay.counts["procs from requested"] == 1  # job 2 has no allocated procs
    with pytest.raises(SwfError, match=r"small.swf.gz:10: job asks for 16 processors"):
        replay_jobs(trace, 8, ReplayOptions(too_wide="error"))


@pytest.mark.parametrize(("line", "message"), [
    ("7 10 0 5 1 -1 -1 1 10 -1 1 1 1 -1 1 -1 -1", "expected 18 fields, found 17"),
    ("7 10 0 5 1 -1 -1 1 ten -1 1 1 1 -1 1 -1 -1 -1", "field requested_time is not a number"),
    ("7 nan 0 5 1 -1 -1 1 10 -1 1 1 1 -1 1 -1 -1 -1",
     "field submit_time is not a finite number: 'nan'"),
    ("7 10 0 inf 1 -1 -1 1 10 -1 1 1 1 -1 1 -1 -1 -1",
     "field run_time is not a finite number: 'inf'"),
    ("7 10 0 5 1 -1 -1 2.5 10 -1 1 1 1 -1 1 -1 -1 -1",
     "field requested_procs is not a whole number: '2.5'"),
    ("7 -3 0 5 1 -1 -1 1 10 -1 1 1 1 -1 1 -1 -1 -1", "field submit_time is negative: '-3'"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.swf"
    path.write_text(HEADER + ROWS + line + "\n")
    with pytest.raises(SwfError, match=rf"bad.swf:12: {message}"):
        read_swf(path)


def test_averages_may_have_fractions_other_fields_may_not(tmp_path):
    path = tmp_path / "averages.swf"
    path.write_text(HEADER + "7 10 0 5 1 2.75 1024.5 1 10 -1 1 1 1 -1 1 -1 -1 -1\n")
    records = read_swf(path).records
    assert records[0, [COLUMN["average_cpu_time"], COLUMN["used_memory"]]].tolist() == [
        2.75, 1024.5]
    write_swf(tmp_path / "back.swf", records)
    assert read_swf(tmp_path / "back.swf").records.tolist() == records.tolist()
    records[0, COLUMN["run_time"]] = 5.5
    with pytest.raises(SwfError, match="record 1, field run_time is not a whole number: 5.5"):
        write_swf(tmp_path / "back.swf", records)
    with pytest.raises(SwfError, match=f"cannot write {tmp_path}: Is a directory"):
        write_swf(tmp_path, read_swf(path).records)


def test_missing_file_and_missing_machine_size(tmp_path):
    with pytest.raises(SwfError, match="does not exist"):
        read_swf(tmp_path / "none.swf")
    path = tmp_path / "headless.swf"
    path.write_text(ROWS)
    with pytest.raises(SwfError, match="no MaxProcs or MaxNodes"):
        replay_jobs(read_swf(path))


def test_schedule_written_as_swf_reads_back(trace_file, tmp_path):
    replay = replay_jobs(read_swf(trace_file))
    sim = run_simulation(replay.jobs, make_policy("fcfs"), replay.procs, kill_at_limit=True)
    out = tmp_path / "schedule.swf"
    write_swf(out, schedule_records(replay, sim), [("Version", "2.2"), ("MaxProcs", "8")])
    back = read_swf(out)
    assert back.max_procs == 8
    assert back.records[:, COLUMN["job_number"]].tolist() == [1, 2, 4]
    # job 4 (3 procs, at 7) waits for job 1's 2 procs until 10, and is killed at its 30 s request
    assert back.records[:, COLUMN["wait_time"]].tolist() == [0, 0, 3]
    assert back.records[:, COLUMN["run_time"]].tolist() == [10, 30, 30]
    assert back.records[:, COLUMN["status"]].tolist() == [1, 1, 0]


# A wide job blocks the queue head on 4 processors; EASY backfills the short jobs around it.
#   (submit, procs, run = requested time): (0, 2, 10) (1, 4, 5) (2, 2, 3) (3, 1, 20) (4, 1, 2)
BLOCKED_HEAD = "; MaxProcs: 4\n" + "".join(
    f"{n} {submit} -1 {run} {procs} -1 -1 {procs} {run} -1 1 1 1 -1 1 -1 -1 -1\n"
    for n, (submit, procs, run) in enumerate([(0, 2, 10), (1, 4, 5), (2, 2, 3), (3, 1, 20),
                                              (4, 1, 2)], start=1))


def table_rows(output: str) -> dict[str, list[str]]:
    """The rows of the tables rich printed: first cell -> the other cells."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_simulate_command_compares_policies(tmp_path):
    trace = tmp_path / "blocked.swf"
    trace.write_text(BLOCKED_HEAD)
    result = CliRunner().invoke(app, [
        "simulate", str(trace), "--policy", "fcfs", "--policy", "easy", "--tau", "5",
        "--out", str(tmp_path / "s.swf"), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    # FCFS starts 0, 10, 15, 15, 15: waits 0 9 13 12 11; EASY 0, 10, 2, 15, 5: waits 0 9 0 12 1.
    # Bounded slowdown max(1, (wait + run) / max(run, 5)): FCFS 1, 2.8, 3.2, 1.6, 2.6;
    # EASY 1, 2.8, 1, 1.6, 1. Both do 68 processor-seconds in 35 s on 4 processors. Queue
    # (jobs waiting) FCFS: 1, 2, 3 over a second each, 4 over [4, 10), 3 over [10, 15): 45 job-s;
    # EASY: 1 over [1, 3), 2, 3 over a second, 2 over [5, 10), 1 over [10, 15): 22 job-s.
    rows = table_rows(result.output)
    assert rows["jobs replayed"] == ["5"]
    assert {label: rows[label] for label in [
        "metric", "jobs", "mean wait (s)", "median wait (s)", "p95 wait (s)",
        "mean bounded slowdown (tau=5 s)", "utilization", "makespan (s)", "mean queue length",
        "max queue length"]} == {
        "metric": ["fcfs", "easy"],
        "jobs": ["5", "5"],
        "mean wait (s)": ["9", "4"],  # 45 / 5, 22 / 5
        "median wait (s)": ["11", "1"],
        "p95 wait (s)": ["13", "11"],  # 12 + 0.8 x 1, 9 + 0.8 x 3 (linear between ranks)
        "mean bounded slowdown (tau=5 s)": ["2.24", "1.48"],  # 11.2 / 5, 7.4 / 5
        "utilization": ["48.6%", "48.6%"],  # 68 / (4 x 35)
        "makespan (s)": ["35", "35"],
        "mean queue length": ["1.3", "0.6"],  # 45 / 35, 22 / 35
        "max queue length": ["4", "3"],
    }
    for policy, waits in (("fcfs", [0, 9, 13, 12, 11]), ("easy", [0, 9, 0, 12, 1])):
        assert read_swf(tmp_path / f"s-{policy}.swf").records[:, COLUMN["wait_time"]].tolist() \
            == waits
    # one picture compares the policies, under the name given (issue 15)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.glob("s*.png")) == ["s.png"]


def test_simulate_command_rejects_a_bad_choice(trace_file, tmp_path):
    result = CliRunner().invoke(app, ["simulate", str(trace_file), "--too-wide", "shrink"])
    assert result.exit_code != 0
    assert "--too-wide 'shrink': choose one of drop, clip, error" in str(result.exception)
    # a bad policy name is refused before the good one before it runs
    result = CliRunner().invoke(app, ["simulate", str(trace_file), "-p", "fcfs", "-p", "lottery",
                                      "--out", str(tmp_path / "s.swf")])
    assert "unknown policy 'lottery'" in str(result.exception)
    assert (result.output, list(tmp_path.glob("s*.swf"))) == ("", [])


# the CLI as `pip install gridcouple` has it: no numpy, no matplotlib (the simulate extra)
WITHOUT_EXTRAS = ("import sys; sys.modules['numpy'] = sys.modules['matplotlib'] = None; "
                  "from gridcouple.cli import main; sys.argv[0] = 'gridcouple'; main()")


def test_the_cli_works_without_the_simulate_extra(trace_file):
    def gridcouple(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], capture_output=True,
                              text=True, timeout=60)

    for args in (["--help"], ["status", "--help"], ["simulate", "--help"]):
        result = gridcouple(*args)
        assert result.returncode == 0, result.stderr
    result = gridcouple("simulate", str(trace_file))
    assert result.returncode == 2
    assert result.stderr.startswith("gridcouple: error: gridcouple simulate cannot run: ")
    assert result.stderr.endswith(" (install gridcouple[simulate])\n")
    assert result.stderr.count("\n") == 1 and "numpy" in result.stderr


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_simulate_output_errors_are_one_line_and_exit_2(trace_file, tmp_path, option,
                                                        monkeypatch, capsys):
    missing = tmp_path / "no-such-folder" / "schedule"
    taken = tmp_path / "a-folder.png"
    taken.mkdir()
    for target, message in ((missing, f"the folder {missing.parent} does not exist"),
                            (taken, f"cannot write {taken}: Is a directory")):
        monkeypatch.setattr(sys, "argv", ["gridcouple", "simulate", str(trace_file), "-p",
                                          "fcfs", option, str(target)])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("gridcouple: error: ") and message in error
        assert error.count("\n") == 1


def traces_folder() -> Path:
    """The real traces' folder; they are data, not a service, so without them the test skips
    (also with CI=true: a clone without ../shared/traces has none to read)."""
    folder = os.environ.get("GRIDCOUPLE_TRACES", "")
    if not folder or not Path(folder).is_dir():
        pytest.skip("the real SWF traces are not here: set GRIDCOUPLE_TRACES to their folder")
    return Path(folder)


@pytest.mark.traces
def test_real_traces_read_with_their_headers():
    folder = traces_folder()
    sdsc = replay_jobs(read_swf(folder / "SDSC-SP2-1998-4.2-cln.swf.gz"))
    assert (sdsc.procs, sdsc.counts["records"]) == (128, 59715)
    assert sdsc.counts["drop: run time <= 0"] == 5681
    assert sdsc.counts["run time > estimate"] == 4134
    lublin = replay_jobs(read_swf(folder / "lublin_256.swf.gz"))
    assert (lublin.procs, len(lublin.jobs)) == (256, lublin.counts["records"])
    assert lublin.counts["procs from allocated"] == 10000  # no requested procs at all
    assert all(job.estimate == job.work for job in lublin.jobs)  # no requested time given


@pytest.mark.traces
def test_real_trace_easy_beats_fcfs_on_kth():
    replay = replay_jobs(read_swf(traces_folder() / "KTH-SP2-1996-2.1-cln.swf.gz"))
    results = {}
    for name in ("fcfs", "easy"):
        sim = Simulator(Machine.processors(replay.procs), make_policy(name))
        sim.add(replay.jobs)
        sim.run()
        results[name] = simulator_metrics(sim)
    fcfs, easy = results["fcfs"], results["easy"]
    assert fcfs.jobs == easy.jobs == 28467
    assert easy.mean_wait < fcfs.mean_wait / 10
    work = sum(j.procs * j.work for j in replay.jobs)
    for metrics in (fcfs, easy):  # the same work, done within the makespan
        assert metrics.utilization == pytest.approx(work / (100 * metrics.makespan))
    assert np.isclose(easy.utilization, 0.699, atol=0.01)
