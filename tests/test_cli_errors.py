"""Bad inputs to the database and the command lines: one clear line and the right exit status, never a
traceback (issue 12).

Each case runs ``python -m jobs`` or ``python -m core`` as a user would (a subprocess in ``tmp_path``,
its own ``WORKBENCH_HOME`` and database) and asserts the exit status (2: what was asked is wrong, 1: it
could not be done), one ``error:`` line naming the problem and the file as the user wrote it, and no
"Traceback". None of them imports torch, so each costs well under a second.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs import db as jobs_db

REPO = Path(__file__).resolve().parents[1]
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes whatever the permissions say
needs_permissions = pytest.mark.skipif(ROOT or sys.platform == "win32", reason="file permissions do not bind root")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_DEBUG", "WORKBENCH_DB_TIMEOUT")}
    e.update(WORKBENCH_HOME=str(tmp_path / "home"), WORKBENCH_DB_URL=f"sqlite:///{tmp_path / 'home' / 'wb.db'}",
             PYTHONPATH=str(REPO))
    return e


def cli(env: dict, cwd: Path, module: str, *args: str, stdin: str | bytes | None = None,
        **extra: str) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**env, **extra}, input=data,
                          capture_output=True, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def error_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert the failure: status ``code``, no traceback, stderr one ``error: ...`` line holding ``words``."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """argparse's own message: usage lines, then ``prog: error: ...``, status 2."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert ": error: " in last and all(w in last for w in words), proc.stderr


def jobs(env, cwd, *args, **kw):
    return cli(env, cwd, "jobs", *args, **kw)


def core(env, cwd, *args, **kw):
    return cli(env, cwd, "core", *args, **kw)


def make_database(path: Path, queued_job: bool = False) -> None:
    database = jobs_db.Database(f"sqlite:///{path}")
    if queued_job:
        with database.write() as s:
            s.execute(sa.text("INSERT INTO jobs (name, kind, status, spec, created_at, step, cancel_requested) "
                              "VALUES ('queued', 'train', 'queued', '{}', '2026-01-01', 0, 0)"))
    database.dispose()


# ------------------------------------------------------------------------------ spec and study files

@pytest.mark.parametrize("name,content,words", [
    ("folder.json", None, ["folder.json is a folder"]),
    ("missing.json", ..., ["missing.json: no such file"]),
    ("random.json", bytes(range(128, 256)) * 4, ["random.json is not a text file"]),
    ("nul.json", b'{"name": "a\x00b"}', ["nul.json is a binary file"]),
    ("broken.json", '{"train": {"max_steps": 3,}}', ["broken.json: not valid JSON", "line 1"]),
    ("nan.json", '{"train": {"learning_rate": NaN}}', ["nan.json: not valid JSON: NaN"]),
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["deep.json: not valid JSON: nested too deeply"]),
    ("empty.json", "", ["empty.json is empty"]),
    ("blank.json", " \n\t\n", ["blank.json is empty"]),
    ("list.json", "[1, 2]", ["list.json holds an array, not a JSON object"]),
    ("bom.json", "\ufeff" + '{"train": {"learning_rate": -1}}', ["bom.json: train.learning_rate"]),
    ("section.json", '{"optimizer": {}}', ["section.json: optimizer: unknown"]),
    ("typed.json", '{"train": {"max_steps": "many"}}', ["typed.json: train.max_steps"]),
])
def test_submit_rejects_a_bad_spec_file_with_one_line(env, tmp_path, name, content, words):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content is not ...:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    error_line(jobs(env, tmp_path, "submit", name), 2, *words)
    assert not (tmp_path / "home" / "wb.db").exists()  # the file is read before the database is opened


@needs_permissions
def test_submit_rejects_an_unreadable_spec(env, tmp_path):
    (tmp_path / "secret.json").write_text("{}")
    (tmp_path / "secret.json").chmod(0)
    error_line(jobs(env, tmp_path, "submit", "secret.json"), 2, "cannot read secret.json", "permission denied")


def test_submit_from_stdin_names_stdin(env, tmp_path):
    error_line(jobs(env, tmp_path, "submit", "-", stdin="not json"), 2, "<stdin>: not valid JSON")


def test_a_spec_with_a_byte_order_mark_is_accepted_and_job_state_errors_fail(env, tmp_path):
    spec = core(env, tmp_path, "spec").stdout
    (tmp_path / "spec.json").write_bytes(b"\xef\xbb\xbf" + spec.encode())
    out = jobs(env, tmp_path, "submit", "spec.json")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[-1]
    # a well-formed request the job's state does not allow: it could not be done (1)
    error_line(jobs(env, tmp_path, "delete", job_id), 1, f"job {job_id} is queued", "cancel it first")
    error_line(jobs(env, tmp_path, "resume", job_id), 1, f"job {job_id} is queued")


@pytest.mark.parametrize("content,words", [
    ("{nope", ["study.json: not valid JSON"]),
    ('{"grid": []}', ["study.json: grid: unknown study key"]),
    ('{"methods": ["nope"]}', ["study.json: methods: unknown method or preset 'nope'"]),
    ('{"seeds": "one"}', ["study.json: seeds: expected a list"]),
])
def test_study_rejects_a_bad_study_file(env, tmp_path, content, words):
    (tmp_path / "study.json").write_text(content)
    error_line(jobs(env, tmp_path, "study", "study.json", "--plan"), 2, *words)


# ------------------------------------------------------------------------------ ids and arguments

@pytest.mark.parametrize("args,words", [
    (["show", "99"], ["no job 99"]),
    (["cancel", "99"], ["no job 99"]),
    (["logs", "99"], ["no job 99"]),
    (["study-show", "7"], ["no study 7"]),
])
def test_unknown_ids_are_usage_errors(env, tmp_path, args, words):
    error_line(jobs(env, tmp_path, *args), 2, *words)


@pytest.mark.parametrize("args,words", [
    (["show", "abc"], ["argument id: invalid int value: 'abc'"]),
    (["list", "--limit", "0"], ["--limit", "at least 1"]),
    (["list", "--status", "done"], ["--status", "invalid choice"]),
    (["worker", "--concurrency", "0"], ["--concurrency"]),
    (["submit", "spec.json", "--target", "3"], ["--target is for --kind evaluate"]),
])
def test_argparse_keeps_its_own_messages(env, tmp_path, args, words):
    usage_error(jobs(env, tmp_path, *args), *words)


def _sigint_as_in_a_terminal() -> None:
    """A child inherits its parent's blocked signals and an ignored SIGINT across exec; within the whole
    suite some library leaves SIGINT blocked or ignored in the test process, and the child would then
    never see the Ctrl-C this test sends. Give it a terminal's SIGINT: deliverable, default action."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_is_one_line(env, tmp_path):
    """Ctrl-C while ``submit -`` waits for its spec on stdin."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "submit", "-"], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    syscall = Path(f"/proc/{proc.pid}/syscall")
    deadline = time.monotonic() + 120  # a loaded machine takes a while to import
    while time.monotonic() < deadline:  # until it blocks reading fd 0 (Linux: syscall 0 = read)
        try:
            if syscall.read_text().startswith("0 0x0 "):
                break
        except OSError:
            proc.kill()
            proc.communicate()
            pytest.skip("needs /proc/<pid>/syscall to see the process wait on stdin")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 1, "interrupted")


def test_debug_shows_the_traceback(env, tmp_path):
    (tmp_path / "folder.json").mkdir()
    out = jobs(env, tmp_path, "submit", "folder.json", WORKBENCH_DEBUG="1")
    assert out.returncode == 2 and "Traceback" in out.stderr and "InputFileError" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: folder.json is a folder, not a job spec"


# ------------------------------------------------------------------------------ the database

def test_a_corrupt_database_file(env, tmp_path):
    (tmp_path / "random.db").write_bytes(os.urandom(8192))
    line = error_line(jobs(env, tmp_path, "--db", "sqlite:///random.db", "list"), 1,
                      "random.db is not a SQLite database", "move it aside")
    assert str(tmp_path) not in line  # the name as given, not resolved


def test_a_text_file_named_workbench_db(env, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "workbench.db").write_text("these are my notes\n")
    env.pop("WORKBENCH_DB_URL")
    error_line(jobs(env, tmp_path, "list"), 1, "workbench.db is not a SQLite database")


def test_a_folder_where_the_database_should_be(env, tmp_path):
    (tmp_path / "wb.db").mkdir()
    error_line(jobs(env, tmp_path, "--db", "sqlite:///wb.db", "show", "1"), 1, "wb.db is a folder")


def test_a_database_inside_a_file(env, tmp_path):
    (tmp_path / "plain").write_text("x")
    error_line(jobs(env, tmp_path, "--db", "sqlite:///plain/wb.db", "list"), 1, "plain is a file, not a folder")


def test_a_locked_database_fails_after_the_busy_timeout(env, tmp_path):
    make_database(tmp_path / "wb.db")
    holder = sqlite3.connect(tmp_path / "wb.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        out = jobs(env, tmp_path, "--db", "sqlite:///wb.db", "list", WORKBENCH_DB_TIMEOUT="0.2")
        error_line(out, 1, "wb.db is locked", "WORKBENCH_DB_TIMEOUT")
        assert time.monotonic() - start < 20
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_bad_busy_timeout_setting(env, tmp_path):
    error_line(jobs(env, tmp_path, "list", WORKBENCH_DB_TIMEOUT="soon"), 1, "WORKBENCH_DB_TIMEOUT", "'soon'")


def test_a_read_only_database_fails_at_the_first_write(env, tmp_path):
    make_database(tmp_path / "wb.db", queued_job=True)
    url = "sqlite:///file:wb.db?mode=ro&uri=true"
    assert jobs(env, tmp_path, "--db", url, "show", "1").returncode == 0  # reading is fine
    error_line(jobs(env, tmp_path, "--db", url, "cancel", "1"), 1, "is read-only")


@needs_permissions
def test_a_read_only_database_file(env, tmp_path):
    make_database(tmp_path / "wb.db")
    (tmp_path / "wb.db").chmod(0o444)
    error_line(jobs(env, tmp_path, "--db", "sqlite:///wb.db", "list"), 1, "wb.db is read-only")


@needs_permissions
def test_a_read_only_folder_for_a_new_database(env, tmp_path):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    try:
        error_line(jobs(env, tmp_path, "--db", "sqlite:///locked/wb.db", "list"), 1,
                   "cannot create locked/wb.db", "read-only")
    finally:
        (tmp_path / "locked").chmod(0o755)


@pytest.mark.parametrize("make,reason,writable,words", [
    (lambda p: p.parent.mkdir(), "unable to open database file", {"parent": False},
     ["cannot create data/wb.db: its folder data is read-only"]),
    (make_database, "unable to open database file", {"file": False}, ["data/wb.db is read-only"]),
    (make_database, "attempt to write a readonly database", {"parent": False},
     ["data/wb.db is in a read-only folder (data;"]),
    (make_database, "attempt to write a readonly database", {"file": False}, ["data/wb.db is read-only"]),
    (make_database, "disk I/O error", {}, ["cannot open data/wb.db (disk I/O error)"]),
])
def test_permission_problems_are_told_from_what_is_on_disk(tmp_path, monkeypatch, make, reason, writable, words):
    """The read-only cases as root (whom permissions do not stop) would see them: ``os.access`` says no."""
    path = tmp_path / "data" / "wb.db"
    make(path)
    real_access = os.access
    denied = {path: not writable.get("file", True), path.parent: not writable.get("parent", True)}
    monkeypatch.setattr(jobs_db.os, "access", lambda p, mode: False if denied.get(Path(p)) else real_access(p, mode))
    err = sa.exc.OperationalError("BEGIN", {}, sqlite3.OperationalError(reason))
    message = str(jobs_db.explain(err, "data/wb.db", path))
    assert all(w in message for w in words), message


def test_a_database_from_a_newer_release(env, tmp_path):
    make_database(tmp_path / "wb.db")
    with sqlite3.connect(tmp_path / "wb.db") as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    error_line(jobs(env, tmp_path, "--db", "sqlite:///wb.db", "list"), 1,
               "wb.db is at schema version 999, newer than this release", "upgrade")


@pytest.mark.parametrize("url,words", [
    ("nonsense", ["'nonsense' is not a database URL"]),
    ("nosuchdb://host/x", ["unknown kind of database"]),
    ("postgresql://me:s3cret@127.0.0.1:1/wb", ["postgresql://me:***@127.0.0.1:1/wb"]),
])
def test_a_url_that_cannot_connect(env, tmp_path, url, words):
    line = error_line(jobs(env, tmp_path, "--db", url, "list"), 1, *words)
    assert "s3cret" not in line


def test_sessions_turn_driver_errors_into_one_line(tmp_path):
    """Opened fine, then locked by another process: ``write()`` raises DatabaseError, not OperationalError."""
    database = jobs_db.Database(f"sqlite:///{tmp_path / 'wb.db'}", busy_timeout_s=0.1)
    holder = sqlite3.connect(tmp_path / "wb.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(jobs_db.DatabaseError, match=r"wb\.db is locked.*0\.1 s busy timeout"):
            with database.write() as session:
                session.execute(sa.text("DELETE FROM jobs"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        database.dispose()
    with pytest.raises(sa.exc.IntegrityError):  # a constraint is the caller's business: unchanged
        with database.write() as session:
            session.execute(sa.text("INSERT INTO jobs (id) VALUES (NULL)"))
    database.dispose()


# ------------------------------------------------------------------------------ WORKBENCH_HOME

def test_workbench_home_is_a_file(env, tmp_path):
    (tmp_path / "data").write_text("x")
    env.pop("WORKBENCH_DB_URL")
    error_line(jobs(env, tmp_path, "list", WORKBENCH_HOME="data"), 1,
               "data folder data ($WORKBENCH_HOME) is a file", "set WORKBENCH_HOME")
    error_line(core(env, tmp_path, "train", WORKBENCH_HOME="data"), 1, "data ($WORKBENCH_HOME) is a file")


@needs_permissions
def test_workbench_home_is_not_writable(env, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o555)
    env.pop("WORKBENCH_DB_URL")
    try:
        error_line(jobs(env, tmp_path, "list", WORKBENCH_HOME="data"), 1, "data ($WORKBENCH_HOME) is not writable")
    finally:
        (tmp_path / "data").chmod(0o755)


def test_workbench_home_not_writable_in_process(tmp_path, monkeypatch):
    from core import paths

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False)
    with pytest.raises(paths.WorkbenchHomeError, match=r"data \(\$WORKBENCH_HOME\) is not writable; set WORKBENCH"):
        paths.workbench_home()


def test_workbench_home_inside_a_file(env, tmp_path):
    (tmp_path / "data").write_text("x")
    error_line(jobs(env, tmp_path, "list", WORKBENCH_HOME="data/wb"), 1, "data/wb ($WORKBENCH_HOME)")


# ------------------------------------------------------------------------------ python -m core

@pytest.mark.parametrize("args,words", [
    (["train", "--config", "folder"], ["folder is a folder, not a job spec"]),
    (["train", "--config", "broken.json"], ["broken.json: not valid JSON"]),
    (["train", "--config", "bad-lr.json"], ["bad-lr.json: train.learning_rate"]),
    (["train", "--config", "bad-lr.json", "--lr", "0"], ["error: train.learning_rate: must be > 0"]),
    (["train", "--out", "run"], ["--out run is not empty", "--resume", "--force"]),
    (["train", "--out", "note.txt"], ["--out note.txt is a file"]),
    (["train", "--out", "run", "--resume", "run"], ["--resume run is not a checkpoint", "run/checkpoints/step-4"]),
    (["train", "--method", "nope"], ["unknown method 'nope'"]),
    (["generate", "--adapter", "gone", "hi"], ["--adapter gone: no such folder"]),
])
def test_core_cli_rejects_bad_arguments_before_loading_anything(env, tmp_path, args, words):
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "bad-lr.json").write_text('{"train": {"learning_rate": -1}}')
    (tmp_path / "note.txt").write_text("x")
    (tmp_path / "run" / "checkpoints" / "step-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-4" / "state.pt").write_bytes(b"")
    error_line(core(env, tmp_path, *args), 2, *words)
    assert (tmp_path / "run" / "checkpoints" / "step-4").is_dir()  # nothing was removed


def test_force_replaces_only_a_previous_runs_outputs(tmp_path):
    from core.__main__ import check_out_dir
    from core.paths import InputFileError

    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "adapter").mkdir()
    for name in ("spec.json", "metrics.jsonl", "notes.txt"):
        (out / name).write_text("x")
    with pytest.raises(InputFileError, match="not empty"):
        check_out_dir(out, "run", resume=None, force=False)
    check_out_dir(out, "run", resume=None, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    check_out_dir(tmp_path / "new", "new", resume=None, force=False)  # a new or empty folder is fine


def test_the_progress_bar_implements_every_training_callback():
    from core.__main__ import ProgressBar
    from core.callbacks import TrainCallbacks

    hooks = {n for n in vars(TrainCallbacks) if not n.startswith("_")}
    assert hooks <= set(dir(ProgressBar))


def test_jobs_cli_stays_free_of_torch(env, tmp_path):
    code = ("import sys; from jobs.__main__ import main; rcs = [main(a) for a in (['list'], ['show', '1'], "
            "['cancel', '1'])]; assert rcs == [0, 2, 2], rcs; assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
