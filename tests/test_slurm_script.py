"""The Slurm backend's pieces that need no cluster: the job script (run by real bash), sbatch
options, the state table, squeue/exit-code parsing and the [backend.slurm] config table."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from gridcouple.backends.batch.script import parse_exit_record, render_script, task_line
from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.backends.slurm.backend import (
    compact_native_ids,
    expand_native_ids,
    parse_sacct,
    parse_squeue,
    sbatch_options,
)
from gridcouple.backends.slurm.states import (
    SLURM_STATES,
    decode_exit_code,
    decode_wait_status,
    to_job_state,
)
from gridcouple.config import load_config
from gridcouple.errors import BackendError, ConfigError
from gridcouple.jobs import JobSpec, JobState, JobStatus, Resources

NASTY = "it's $(touch pwned) `id` \"q\" ; & | \\ *\n二"


def write_submission(tmp_path, lines: list[str]):
    """A submission's task file and script, as the Slurm backend writes them."""
    tasks = tmp_path / "batch.tasks"
    tasks.write_text("\n".join(lines) + "\n")
    script = tmp_path / "batch.sh"
    script.write_text(render_script(tasks=tasks, task_index=SlurmBackend.TASK_INDEX,
                                    state_dir=tmp_path))
    return script


def run_job_script(spec: JobSpec, tmp_path, workdir=None, output=("stdout", "stderr")):
    """Write a one-task submission the way the backend does and run it with bash (no Slurm)."""
    home = tmp_path / "home dir"
    script = write_submission(tmp_path, [task_line(
        spec, job_id=7, home=home, workdir=workdir or home, stdout=home / output[0],
        stderr=home / output[1])])
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    return proc, home


def test_user_values_reach_the_command_verbatim(tmp_path):
    spec = JobSpec(argv=("python3", "-c", "import os, sys; print(repr(sys.argv[1:]), "
                         "repr(os.environ['VALUE']), os.environ['GRIDCOUPLE_JOB_ID'])", NASTY),
                   environment={"VALUE": NASTY})
    proc, home = run_job_script(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (home / "stdout").read_text() == f"{[NASTY]!r} {NASTY!r} 7\n"
    assert not list(tmp_path.rglob("pwned"))
    kind, code, start, end = (home / "exit_code").read_text().split()
    assert (kind, code) == ("exit", "0") and float(start) <= float(end)


def test_script_without_shebang_runs_with_sh_and_exit_code_is_recorded(tmp_path):
    spec = JobSpec(script="echo to stderr >&2\nexit 3\n")
    proc, home = run_job_script(spec, tmp_path, output=("both", "both"))
    assert proc.returncode == 3
    assert (home / "both").read_text() == "to stderr\n"
    assert parse_exit_record((home / "exit_code").read_text())[:2] == (3, None)


def test_missing_working_directory_fails_with_a_message(tmp_path):
    proc, home = run_job_script(JobSpec(argv=("true",)), tmp_path, workdir=tmp_path / "absent")
    assert proc.returncode == 1
    assert "cannot enter the job directory" in proc.stderr and "absent" in proc.stderr
    assert (home / "exit_code").read_text().startswith("exit 1 ")


def test_bad_environment_name_is_refused(tmp_path):
    with pytest.raises(BackendError, match="environment variable name 'A-B'"):
        task_line(JobSpec(argv=("true",), environment={"A-B": "1"}), job_id=1,
                  home=tmp_path, workdir=tmp_path, stdout=tmp_path / "o", stderr=tmp_path / "e")


def test_batch_script_maps_array_tasks_to_journal_ids(tmp_path):
    root = tmp_path / "jobs root"
    lines = [task_line(JobSpec(argv=("echo", f"job {job_id}")), job_id=job_id,
                       home=root / str(job_id), workdir=tmp_path,
                       stdout=root / str(job_id) / "stdout", stderr=root / str(job_id) / "stderr")
             for job_id in (4, 9)]
    script = write_submission(tmp_path, lines)
    for task in ("0", "1"):
        subprocess.run(["bash", str(script)], env={"SLURM_ARRAY_TASK_ID": task}, check=True)
    outputs = [(root / str(job_id) / "stdout").read_text() for job_id in (4, 9)]
    assert outputs == ["job 4\n", "job 9\n"]


def test_default_resources_emit_no_sbatch_option():
    assert sbatch_options(JobSpec(argv=("true",)), SlurmOptions()) == ()


def test_resources_and_options_map_to_sbatch_options():
    spec = JobSpec(argv=("true",), resources=Resources(cpus=4, memory_mb=2048, gpus=1,
                                                       walltime=61, nodes=2),
                   attributes={"slurm.qos": "short", "slurm.extra_directives": ["--exclusive"]})
    options = SlurmOptions(partition="debug", qos="normal", extra_directives=["--requeue"])
    assert sbatch_options(spec, options) == (
        "--partition=debug", "--qos=short", "--nodes=2", "--cpus-per-task=4", "--mem=2048M",
        "--gpus=1", "--time=2", "--requeue", "--exclusive")


def test_extra_directives_attribute_may_be_one_string():
    spec = JobSpec(argv=("true",),
                   attributes={"slurm.extra_directives": "--exclusive --job-name=x"})
    assert sbatch_options(spec, SlurmOptions()) == ("--exclusive", "--job-name=x")


def test_unknown_slurm_attribute_is_named():
    spec = JobSpec(argv=("true",), attributes={"slurm.partion": "x"})
    with pytest.raises(BackendError, match=r"unknown attribute 'slurm.partion'.*slurm.partition"):
        sbatch_options(spec, SlurmOptions())


@pytest.mark.parametrize("native, reason, expected", [
    ("PENDING", "Resources", JobState.QUEUED),
    ("PENDING", "JobHeldUser", JobState.HELD),
    ("PENDING", "JobHeldAdmin", JobState.HELD),
    ("RUNNING", "None", JobState.ACTIVE),
    ("COMPLETING", "", JobState.ACTIVE),
    ("SUSPENDED", "", JobState.SUSPENDED),
    ("REQUEUED", "", JobState.QUEUED),
    ("TIMEOUT", "", JobState.TIMEOUT),
    ("OUT_OF_MEMORY", "", JobState.FAILED),
    ("CANCELLED by 0", "", JobState.CANCELED),
    ("CANCELLED+", "", JobState.CANCELED),
    ("NO_SUCH_STATE", "", None),
])
def test_state_table(native, reason, expected):
    assert to_job_state(native, reason) is expected


def test_every_state_named_in_the_notes_is_mapped():
    listed = ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "COMPLETED", "CANCELLED",
              "FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "DEADLINE",
              "PREEMPTED", "REQUEUED", "SUSPENDED", "REVOKED", "SPECIAL_EXIT", "RESV_DEL_HOLD",
              "REQUEUE_FED", "REQUEUE_HOLD"]
    assert [s for s in listed if s not in SLURM_STATES] == []


def test_wait_status_and_sacct_exit_code_decoding():
    assert decode_wait_status(768) == (3, None)
    assert decode_wait_status(0) == (0, None)
    assert decode_wait_status(9) == (None, 9)
    assert decode_exit_code("3:0") == (3, None)
    assert decode_exit_code("0:9") == (None, 9)
    assert decode_exit_code("") == (None, None)


def test_squeue_lines_and_array_remainders():
    text = ("12|FAILED|NonZeroExitCode|768|2026-01-02T03:04:05|2026-01-02T03:04:06|"
            "2026-01-02T03:04:07|vm\n"
            "13_[2-3,7%4]|PENDING|Resources|0|2026-01-02T03:04:05|N/A|N/A|\n")
    rows = parse_squeue(text, with_comment=False)
    assert sorted(rows) == ["12", "13_2", "13_3", "13_7"]
    failed = rows["12"].status(JobStatus(JobState.QUEUED))
    assert (failed.state, failed.exit_code, failed.host) == (JobState.FAILED, 3, "vm")
    assert failed.end_time - failed.start_time == 1
    waiting = rows["13_7"].status(JobStatus(JobState.QUEUED))
    assert (waiting.describe(), waiting.start_time) == ("QUEUED: PENDING (Resources)", None)


def test_sacct_lines_as_slurm_22_05_prints_them():
    text = ("40_1|FAILED|3:0|2026-01-02T03:04:05|2026-01-02T03:04:09|vm\n"
            "40_2|CANCELLED by 0|0:15|2026-01-02T03:04:05|2026-01-02T03:04:06|vm\n"
            "40_[3-4]|CANCELLED by 0|0:0|None|2026-01-02T03:04:06|None assigned\n"
            "40_[5-6]|PENDING|0:0|Unknown|Unknown|None assigned\n"
            "41|TIMEOUT|0:0|2026-01-02T03:04:05|2026-01-02T03:05:05|vm\n"
            "42|OUT_OF_MEMORY|0:125|2026-01-02T03:04:05|2026-01-02T03:04:06|vm\n"
            "43|FAILED|0:9|2026-01-02T03:04:05|2026-01-02T03:04:06|vm\n")
    queued = JobStatus(JobState.QUEUED)
    found = parse_sacct(text, dict.fromkeys(["40_1", "40_2", "40_4", "40_6", "41", "42", "43"],
                                            queued))
    assert sorted(found) == ["40_1", "40_2", "40_4", "40_6", "41", "42", "43"]
    assert [(s.state, s.native_state, s.exit_code, s.signal) for s in found.values()] == [
        (JobState.FAILED, "FAILED", 3, None),
        (JobState.CANCELED, "CANCELLED by 0", None, 15),
        (JobState.CANCELED, "CANCELLED by 0", 0, None),
        (JobState.QUEUED, "PENDING", None, None),
        (JobState.TIMEOUT, "TIMEOUT", 0, None),
        (JobState.FAILED, "OUT_OF_MEMORY", None, 125),
        (JobState.FAILED, "FAILED", None, 9),
    ]
    assert found["40_1"].end_time - found["40_1"].start_time == 4
    assert (found["40_1"].host, found["40_4"].host, found["40_4"].start_time) == ("vm", "", None)
    assert found["43"].describe() == ("FAILED (from sacct (no longer listed by squeue)) "
                                      "[killed by SIGKILL]")


def test_native_id_lists_compact_and_expand():
    assert compact_native_ids(["7", "9_0", "9_1", "9_2", "9_5", "10_4"]) == [
        "7", "9_[0-2,5]", "10_[4]"]
    assert expand_native_ids("9_[0-2,5]") == ["9_0", "9_1", "9_2", "9_5"]


def test_exit_records():
    assert parse_exit_record("exit 0 10 12\n") == (0, None, 10.0, 12.0)
    assert parse_exit_record("signal 15 10 12") == (None, 15, 10.0, 12.0)
    assert parse_exit_record("exit 137 10 12") == (None, 9, 10.0, 12.0)
    with pytest.raises(BackendError, match="exit-code file holds 'garbage'"):
        parse_exit_record("garbage")


def test_config_table_is_validated_with_file_and_line(tmp_path):
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text(textwrap.dedent("""
        [backend]
        name = "slurm"

        [backend.slurm]
        partition = "debug"
        extra_directives = ["#SBATCH --exclusive"]
    """))
    config = load_config(config_file)
    with pytest.raises(ConfigError, match=r"gridcouple.toml:7: \[backend.slurm\] "
                                          r"extra_directives: '#SBATCH --exclusive'"):
        config.backend_options("slurm", SlurmOptions)
    config_file.write_text('[backend.slurm]\nqueue = "x"\n')
    with pytest.raises(ConfigError, match=r"gridcouple.toml:2: \[backend.slurm\] queue: unknown"):
        load_config(config_file).backend_options("slurm", SlurmOptions)
