"""The ``trioq`` command as a user runs it: real subprocesses against a real broker process.

One broker (``trioq broker --workers 1 --concurrency 1``, so with one supervised
local worker) serves the whole module; each test waits for its own jobs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from trioq.broker.config import BrokerConfig
from trioq.cli import main

from .procs import BrokerProcess, free_port

pytestmark = pytest.mark.slow

UNKNOWN = "0123456789abcdef"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    port = free_port()
    b = BrokerProcess(
        ["broker", "--port", str(port), "--no-http", "--db", str(cwd / "q.db"), "--workers", "1",
         "--concurrency", "1", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "5"],
        cwd,
    )
    b.port = port
    try:
        b.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
        b.wait_for(r"worker local-1 joined")
        yield b
    finally:
        b.stop()


def trioq_cmd(broker: BrokerProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioq", *args, "--broker", f"127.0.0.1:{broker.port}"],
        cwd=broker.cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def job_json(broker: BrokerProcess, job_id: str) -> tuple[dict, str]:
    r = trioq_cmd(broker, "job", job_id)
    assert r.returncode == 0, r.stderr
    head, _, tb = r.stdout.partition("traceback:\n")
    return json.loads(head), tb


def test_submit_wait_prints_the_result(broker):
    r = trioq_cmd(broker, "submit", "reverse_string", "--payload", '{"data":"abc"}', "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cba\n"


def test_result_wait_returns_as_soon_as_the_job_ends(broker):
    r = trioq_cmd(broker, "submit", "slow_task", "--payload", '{"seconds": 3}')
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", job_id)
    t0 = time.time()
    with subprocess.Popen(
        [sys.executable, "-m", "trioq", "result", job_id, "--wait", "--timeout", "30",
         "--broker", f"127.0.0.1:{broker.port}"],
        cwd=broker.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    ) as p:
        line = p.stdout.readline()  # the moment the answer is printed, not the interpreter's exit
        t1 = time.time()
        rest, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert line == "slept 3s\n" and rest == ""
    job, _ = job_json(broker, job_id)
    assert job["state"] == "completed"
    assert job["finished_at"] > t0  # it did wait for the job...
    assert t1 - job["finished_at"] < 1.0  # ...and came back right after it ended


def test_status_and_jobs(broker):
    r = trioq_cmd(broker, "submit", "to_uppercase", "--payload", '{"data":"x"}', "--count", "6", "--wait")
    assert r.returncode == 0, r.stderr
    assert "6 completed, 0 not completed" in r.stdout
    r = trioq_cmd(broker, "status")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^workers\s+1 \(", r.stdout, re.M)
    assert re.search(r"^queue size\s+\d+", r.stdout, re.M)
    completed = int(re.search(r"completed (\d+)", r.stdout).group(1))
    assert completed >= 6
    assert "store: sqlite" in r.stdout
    r = trioq_cmd(broker, "jobs", "--state", "completed", "--limit", "5")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:4] == ["ID", "TASK", "PRI", "STATE"]
    assert len(rows) == 5
    assert all(row.split()[3] == "completed" for row in rows)
    assert all(row.split()[1] == "to_uppercase" and '"X"' in row for row in rows)  # newest first


def test_failed_job_details_retry_and_discard(broker):
    r = trioq_cmd(broker, "submit", "fibonacci", "--payload", '{"n": -1}', "--max-attempts", "1", "--wait")
    assert r.returncode == 4
    m = re.search(r"job ([0-9a-f]{16}) dead: ValueError: n must be", r.stderr)
    assert m, r.stderr
    job_id = m.group(1)
    job, tb = job_json(broker, job_id)
    assert job["state"] == "dead" and job["attempts"] == 1 and job["failures"] == 1
    assert job["dead_reason"] == "failed"
    assert job["error"]["type"] == "ValueError" and "n must be" in job["error"]["message"]
    assert "Traceback (most recent call last)" in tb and "fibonacci" in tb
    r = trioq_cmd(broker, "retry", job_id)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"job {job_id}: retry done, state (queued|running|dead)\n", r.stdout)
    r = trioq_cmd(broker, "result", job_id, "--wait", "--timeout", "30")
    assert r.returncode == 4  # it fails again, as it must
    assert f"job {job_id} dead: ValueError" in r.stderr
    job, _ = job_json(broker, job_id)
    assert job["attempts"] == 2
    r = trioq_cmd(broker, "discard", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"job {job_id}: discard done, state dead\n"
    r = trioq_cmd(broker, "job", job_id)
    assert r.returncode == 2 and f"unknown job id {job_id}" in r.stderr


def test_cancel_a_delayed_job(broker):
    r = trioq_cmd(broker, "submit", "noop", "--delay", "3600")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    r = trioq_cmd(broker, "cancel", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"job {job_id}: cancel done, state cancelled\n"  # it was waiting, not running
    job, _ = job_json(broker, job_id)
    assert job["state"] == "cancelled" and job["attempts"] == 0
    r = trioq_cmd(broker, "cancel", job_id)
    assert r.returncode == 2 and "invalid_state" in r.stderr and "already cancelled" in r.stderr


def test_pause_and_resume_a_queue(broker):
    r = trioq_cmd(broker, "pause", "bad name")
    assert r.returncode == 1 and "invalid_field" in r.stderr and "queue name" in r.stderr
    r = trioq_cmd(broker, "pause")
    try:
        assert (r.returncode, r.stdout) == (0, "queue default: paused\n"), r.stderr
        r = trioq_cmd(broker, "submit", "to_uppercase", "--payload", '{"data": "later"}')
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        job, _ = job_json(broker, job_id)
        assert job["state"] == "queued" and job["attempts"] == 0
    finally:
        r = trioq_cmd(broker, "resume")
    assert (r.returncode, r.stdout) == (0, "queue default: dispatching\n"), r.stderr
    r = trioq_cmd(broker, "result", job_id, "--wait", "--timeout", "30")
    assert r.returncode == 0 and "LATER" in r.stdout, (r.stdout, r.stderr)


def test_unknown_id_is_a_clear_error_for_every_command(broker):
    commands = [("job",), ("cancel",), ("retry",), ("discard",), ("result", "--wait")]
    with ThreadPoolExecutor(2) as pool:  # two cores
        results = list(pool.map(lambda cmd: trioq_cmd(broker, cmd[0], UNKNOWN, *cmd[1:]), commands))
    for cmd, r in zip(commands, results, strict=True):
        assert r.returncode == 2, (cmd, r.returncode, r.stdout, r.stderr)
        assert r.stderr.strip() == f"error: unknown job id {UNKNOWN}", (cmd, r.stderr)
        assert r.stdout == ""


def test_bad_payload_and_priority_are_refused_before_connecting(tmp_path):
    runner = CliRunner()
    # nothing listens on port 1: an error about the input must come first
    r = runner.invoke(main, ["submit", "reverse_string", "--payload", "{not json", "--broker", "127.0.0.1:1"])
    assert r.exit_code == 2
    assert "--payload" in r.output and "not valid JSON" in r.output
    r = runner.invoke(main, ["submit", "reverse_string", "--priority", "0", "--broker", "127.0.0.1:1"])
    assert r.exit_code == 2
    assert "--priority" in r.output and "0 is not in the range 1<=x<=10" in r.output


def test_a_worker_with_a_bad_queue_name_is_refused_before_connecting(tmp_path):
    r = CliRunner().invoke(main, ["worker", "--queues", "default,a b", "--broker", "127.0.0.1:1"])
    assert r.exit_code == 2
    assert "--queues" in r.output and "'a b': a queue name is 1-200 letters" in r.output


@pytest.mark.parametrize("args, hint, says", [
    (["submit", "noop", "--delay", "inf"], "--delay", "'inf' is not a finite number of seconds"),
    (["submit", "noop", "--timeout", "nan"], "--timeout", "'nan' is not a finite number of seconds"),
    (["submit", "noop", "--wait", "--wait-timeout", "nan"], "--wait-timeout", "not a finite number"),
    (["broker", "--heartbeat-interval", "nan"], "--heartbeat-interval", "not a finite number"),
    (["broker", "--result-ttl", "inf"], "--result-ttl", "not a finite number"),
    (["submit", "noop", "--payload", '{"x": NaN}'], "--payload", "NaN is not JSON"),
    (["submit", "noop", "--payload", '{"x": 1e400}'], "--payload", "1e400 is out of range"),
    (["submit", "noop", "--payload", '{"x": 100000000000000000000000000}'], "--payload", "not valid for a payload"),
])
def test_numbers_json_cannot_carry_are_refused_before_anything_starts(args, hint, says):
    """nan and inf passed click's ranges: a job delayed by inf ran at once, a broker with a
    heartbeat interval of nan refused every client, a payload's NaN became null."""
    r = CliRunner().invoke(main, [*args, "--broker", "127.0.0.1:1"] if args[0] == "submit" else args)
    assert r.exit_code == 2, r.output
    assert hint in r.output and says in r.output


@pytest.mark.parametrize("flag, value, says", [
    ("--restore-chunk", "0", "0 is not in the range"),
    ("--restore-chunk", "many", "'many' is not a valid integer"),
    ("--shutdown-grace", "-1", "-1.0 is not in the range"),
    ("--shutdown-grace", "nan", "nan"),
    ("--shutdown-grace", "soon", "'soon'"),
])
def test_a_bad_restore_chunk_or_shutdown_grace_is_refused_before_the_broker_starts(flag, value, says, tmp_path):
    r = CliRunner().invoke(main, ["broker", "--db", str(tmp_path / "q.db"), flag, value])
    assert r.exit_code == 2, r.output
    assert flag in r.output and says in r.output
    assert not (tmp_path / "q.db").exists()  # refused before anything was opened


@pytest.mark.parametrize("field, value, says", [
    ("restore_chunk", 0, "restore_chunk must be positive"),
    ("shutdown_grace", float("inf"), "shutdown_grace must be a finite number, 0 or more"),
])
def test_a_broker_config_refuses_a_bad_restore_chunk_or_shutdown_grace(field, value, says):
    with pytest.raises(ValueError, match=says):
        BrokerConfig(**{field: value}).validate()


def test_a_broker_config_with_nan_is_refused():
    with pytest.raises(ValueError, match="heartbeat_interval must be a positive number of seconds"):
        BrokerConfig(heartbeat_interval=math.nan).validate()
    with pytest.raises(ValueError, match="lease_grace must be a finite number"):
        BrokerConfig(lease_grace=math.inf).validate()


def test_a_broker_that_cannot_start_says_why_in_one_line(tmp_path):
    """A journal that is not one, a directory, a port in use, a broken certificate: one line
    that names the problem, not a traceback through the nursery that met it."""
    import socket

    base = ["broker", "--port", "0", "--http-port", "0", "--certs-dir", str(tmp_path / "certs"), "--no-gc-tuning"]
    (tmp_path / "bad.db").write_text("garbage")
    (tmp_path / "dir.db").mkdir()
    runner = CliRunner()
    r = runner.invoke(main, [*base, "--db", str(tmp_path / "bad.db")])
    assert r.exit_code == 1 and f"error: cannot open the journal {tmp_path / 'bad.db'}: file is not a database" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, [*base, "--db", str(tmp_path / "dir.db")])
    assert r.exit_code == 1 and "unable to open database file" in r.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(main, [*base, "--db", str(tmp_path / "ok.db"), "--port", str(port)])
    assert r.exit_code == 1 and "error: cannot start the broker:" in r.output and "Address already in use" in r.output
    (tmp_path / "certs" / "server.pem").write_text("garbage")
    r = runner.invoke(main, [*base, "--db", str(tmp_path / "ok.db")])
    assert r.exit_code == 1 and "error: cannot load the server certificate and key" in r.output


def test_a_token_name_that_could_forge_log_lines_is_refused(tmp_path):
    """It becomes its jobs' owner and goes into logs, like a HELLO name: printable, 1-200."""
    auth = tmp_path / "tokens.jsonl"
    runner = CliRunner()
    for bad in ("evil\nname", "x" * 201):
        r = runner.invoke(main, ["token", "create", "--role", "producer", "--name", bad, "--auth-file", str(auth)])
        assert r.exit_code == 2 and "a token name must be 1-200 printable characters" in r.output
    assert not auth.exists()
    r = runner.invoke(main, ["token", "create", "--role", "producer", "--name", "ok-name", "--auth-file", str(auth)])
    assert r.exit_code == 0 and "ok-name" in auth.read_text()
    auth.write_text(auth.read_text() + '{"name": "a\\u0007b", "role": "producer", "hash": "sha256:00"}\n')
    from trioq.broker.auth import AuthFileError, read_auth_file

    with pytest.raises(AuthFileError, match=":2: a token name must be"):
        read_auth_file(auth)


def test_count_with_an_idempotency_key_is_refused():
    """One key names one job: five submits of it printed 'submitted 5 jobs' for one."""
    r = CliRunner().invoke(main, ["submit", "noop", "--count", "5", "--idempotency-key", "k", "--broker", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--idempotency-key names one job" in r.output


def test_a_broker_that_goes_away_while_a_command_waits_exits_3(monkeypatch, capsys):
    """As one that cannot be reached: a restart during 'result --wait' printed a raw
    BrokenResourceError and exited 1."""
    from trioq import cli
    from trioq.errors import ConnectionLost

    class Dummy:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    async def waits(c):
        raise ConnectionLost("connection broken: BrokenResourceError()")

    monkeypatch.setattr(cli, "make_client", lambda opts, role="producer": Dummy())
    with pytest.raises(SystemExit) as info:
        cli.run_client(waits, {})
    assert info.value.code == 3
    assert "error: lost the connection to the broker: connection broken" in capsys.readouterr().err


def test_names_a_certificate_cannot_hold_and_a_task_beside_demo_are_refused(tmp_path):
    runner = CliRunner()
    for san in ("", "not a name!!", "a..b"):
        r = runner.invoke(main, ["certs", "--dir", str(tmp_path / "c"), "--san", san])
        assert r.exit_code == 2 and "is neither an IP address nor a DNS name" in r.output, san
    assert not (tmp_path / "c" / "server.pem").exists()
    r = runner.invoke(main, ["certs", "--dir", str(tmp_path / "c"), "--san", "broker.internal", "--san", "10.0.0.5"])
    assert r.exit_code == 0 and (tmp_path / "c" / "server.pem").exists()
    r = runner.invoke(main, ["submit", "noop", "--demo", "--broker", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--demo submits its own jobs" in r.output
    r = runner.invoke(main, ["broker", "--http-allowed-host", "queue internal:8080"])  # refused before it starts
    assert r.exit_code == 2 and "--http-allowed-host" in r.output and "neither an IP address nor a DNS name" in r.output


def test_json_output_of_submit_is_one_object_a_job_whatever_the_count(broker):
    for n in (1, 3):
        r = trioq_cmd(broker, "submit", "noop", "--count", str(n), "--json")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == n and all(set(json.loads(line)) == {"id"} for line in lines)


def test_demo_shows_the_urgent_job_overtaking_waiting_slow_jobs(broker):
    r = trioq_cmd(broker, "submit", "--demo", timeout=90)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1 worker(s) with 1 free slot(s): submitting 3 x slow_task at priority 5" in out
    lines = re.findall(r"finished: (reverse_string|slow_task #\d)\s.*? at (\d\d:\d\d:\d\d\.\d+)", out)
    assert sorted(label for label, _ in lines) == ["reverse_string", "slow_task #1", "slow_task #2", "slow_task #3"]
    at = dict(lines)
    # one slot: at most the slow job already running finishes first; the waiting ones come after, a second later
    assert at["slow_task #2"] > at["reverse_string"] and at["slow_task #3"] > at["reverse_string"]
    m = re.search(r"the urgent job finished (\d) of 4", out)
    assert m and int(m.group(1)) <= 2
    # the summary ranks by the finish time the broker recorded (results arrive in batches, so print order may differ)
    assert sum(1 for t in at.values() if t < at["reverse_string"]) <= int(m.group(1)) - 1


def test_supervised_worker_is_restarted_after_kill9(broker):
    m, i = broker.wait_for(r"started local worker 1 \(pid (\d+)\)")
    while True:  # the latest start line: the pid of the worker alive now
        try:
            m, i = broker.wait_for(r"started local worker 1 \(pid (\d+)\)", after=i + 1, within=0)
        except AssertionError:
            break
    pid = int(m.group(1))
    _, joined_at = broker.wait_for(r"worker local-1 joined", after=i)
    os.kill(pid, signal.SIGKILL)
    broker.wait_for(rf"local worker 1 \(pid {pid}\) exited with -9; restarting", after=i)
    m2, j = broker.wait_for(r"started local worker 1 \(pid (\d+)\)", after=i + 1)
    assert int(m2.group(1)) != pid
    broker.wait_for(r"worker local-1 lost", after=joined_at)
    broker.wait_for(r"worker local-1 joined", after=j)
    r = trioq_cmd(broker, "submit", "reverse_string", "--payload", '{"data":"again"}', "--wait")
    assert r.returncode == 0 and r.stdout == "niaga\n", r.stderr
