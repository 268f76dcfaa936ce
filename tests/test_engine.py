"""The engine: stages, stamps, failure isolation, logs, Dask, and a build killed midway."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
from engine_tasks import done, forget, swallowed_interrupt, two_stages, upper
from rich.console import Console

from ks4release.atomic import ReleasePathError, temporary_sibling
from ks4release.engine import Engine, RunSummary, Stage, Task, default_worker_count
from ks4release.stamps import read_stamp

TESTS = Path(__file__).resolve().parent
NAMES = ["a", "b", "c"]


@pytest.fixture
def raw(tmp_path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for name in NAMES:
        (folder / f"{name}.txt").write_text(f"input {name}\n")
    return folder


@pytest.fixture
def release(tmp_path) -> Path:
    return (tmp_path / "release").resolve()


def build(release: Path, raw: Path, **options) -> RunSummary:
    engine_options = {"local": True, "progress": False}
    for name in ("local", "progress", "workers"):
        if name in options:
            engine_options[name] = options.pop(name)
    return Engine(release, **engine_options).run(two_stages(raw, NAMES, **options), release)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Contents and mtimes of every file below ``folder`` except logs."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


def counts(summary: RunSummary, stage: str) -> tuple[int, int, int, int]:
    s = summary.stage(stage)
    return s.ran, s.skipped, s.failed, s.blocked


def test_two_stage_build_writes_the_expected_outputs_and_stamps(release, raw):
    summary = build(release, raw)
    assert summary.ok, summary.text()
    assert counts(summary, "upper") == (3, 0, 0, 0)
    assert counts(summary, "digest") == (3, 0, 0, 0)
    for name in NAMES:
        upper_text = f"INPUT {name.upper()}\n"
        assert (release / "up" / f"{name}.txt").read_text() == upper_text
        assert (release / "sha" / f"{name}.sha").read_text() == \
            hashlib.sha256(upper_text.encode()).hexdigest() + "\n"
    stamps = sorted((release / "work" / "stamps" / "digest").glob("*.json"))
    assert len(stamps) == 3
    fingerprint = read_stamp(stamps[0])["fingerprint"]
    assert fingerprint["func"] == "engine_tasks:digest"
    assert fingerprint["inputs"][0]["path"] == "up/a.txt"
    assert fingerprint["outputs"] == ["sha/a.sha"]
    assert "sha256" in fingerprint["inputs"][0]
    assert fingerprint["kwargs"]["dst"] == "$RELEASE/sha/a.sha"
    assert not list(release.rglob(".*.tmp-*"))
    assert "build OK" in summary.text()
    console = Console(file=io.StringIO(), width=100)
    console.print(summary.render())
    assert "build OK" in console.file.getvalue() and "digest" in console.file.getvalue()


def test_rerun_skips_everything_and_changes_no_file(release, raw):
    assert build(release, raw).ok
    before = snapshot(release)
    time.sleep(0.01)
    summary = build(release, raw)
    assert summary.ok
    assert counts(summary, "upper") == (0, 3, 0, 0)
    assert counts(summary, "digest") == (0, 3, 0, 0)
    assert snapshot(release) == before  # same bytes and same mtimes, stamps included


def test_a_moved_release_keeps_its_stamps(release, raw, tmp_path):
    assert build(release, raw).ok
    moved = tmp_path / "moved"
    release.rename(moved)
    summary = build(moved, raw)
    assert counts(summary, "upper") == (0, 3, 0, 0)
    assert counts(summary, "digest") == (0, 3, 0, 0)


def test_a_changed_input_reruns_exactly_its_dependent_tasks(release, raw):
    assert build(release, raw).ok
    before = snapshot(release)
    (raw / "b.txt").write_text("input b, revised\n")
    summary = build(release, raw)
    assert summary.ok
    assert counts(summary, "upper") == (1, 2, 0, 0)
    assert counts(summary, "digest") == (1, 2, 0, 0)
    after = snapshot(release)
    changed = {k for k in after if after[k] != before.get(k)}
    assert {"up/b.txt", "sha/b.sha"} <= changed
    assert not changed & {"up/a.txt", "up/c.txt", "sha/a.sha", "sha/c.sha"}


def test_changed_params_and_missing_outputs_rerun_the_task(release, raw):
    assert build(release, raw).ok
    summary = build(release, raw, salt="pepper")  # a kwarg of the digest tasks only
    assert counts(summary, "upper") == (0, 3, 0, 0)
    assert counts(summary, "digest") == (3, 0, 0, 0)
    (release / "up" / "c.txt").unlink()
    summary = build(release, raw, salt="pepper")
    # c's copy is rewritten with the same bytes: its content fingerprint stops the cascade
    assert counts(summary, "upper") == (1, 2, 0, 0)
    assert counts(summary, "digest") == (0, 3, 0, 0)


def test_a_failing_task_does_not_stop_the_others(release, raw):
    summary = build(release, raw, fail=frozenset({"b"}))
    assert not summary.ok
    assert counts(summary, "upper") == (2, 0, 1, 0)
    assert counts(summary, "digest") == (2, 0, 0, 1)
    assert (release / "sha" / "a.sha").exists() and (release / "sha" / "c.sha").exists()
    failed, blocked = summary.failures
    assert (failed.stage, failed.key, failed.tile, failed.band) == ("upper", "b/B", "b", "B")
    assert failed.file == str(raw / "b.txt")
    assert failed.error_type == "RuntimeError" and failed.message == "cannot process b.txt"
    assert "explode" in failed.traceback
    assert blocked.blocked and blocked.stage == "digest" and blocked.key == "b/B"
    assert "upstream failed" in blocked.message
    text = summary.text()
    assert "FAILED upper/b/B [tile=b, band=B, file=" in text
    assert "RuntimeError: cannot process b.txt" in text
    assert "blocked digest/b/B" in text
    console = Console(file=io.StringIO(), width=200)
    console.print(summary.render())
    assert "RuntimeError: cannot process b.txt" in console.file.getvalue()
    # the log file of the run names the failing task, its error and traceback
    assert summary.log_file.parent == release / "logs"
    log_text = summary.log_file.read_text()
    assert "FAILED upper/b/B" in log_text and "cannot process b.txt" in log_text
    assert "Traceback" in log_text and "done digest/a/B" in log_text
    # a fixed task reruns alone, then its dependants
    summary = build(release, raw)
    assert summary.ok
    assert counts(summary, "upper") == (1, 2, 0, 0)
    assert counts(summary, "digest") == (1, 2, 0, 0)


def test_stale_outputs_of_a_failed_task_block_its_dependants(release, raw):
    assert build(release, raw).ok
    (raw / "b.txt").write_text("changed\n")
    summary = build(release, raw, fail=frozenset({"b"}))
    assert counts(summary, "upper") == (0, 2, 1, 0)
    assert counts(summary, "digest") == (0, 2, 0, 1)  # up/b.txt exists but is stale
    engine = Engine(release, local=True)
    assert not engine.stamp_path("upper", "b/B").exists()  # the old stamp went with the rerun
    assert engine.stamp_path("upper", "a/B").exists()


def test_a_warning_goes_to_the_log_and_the_task_succeeds(release, raw):
    summary = build(release, raw, cautious=frozenset({"a"}))
    assert summary.ok and counts(summary, "upper") == (3, 0, 0, 0)
    assert "upper/a/B (tile=a, band=B): UserWarning: a.txt looks odd" in \
        summary.log_file.read_text()


def test_a_task_that_does_not_write_its_output_fails(release, raw):
    summary = build(release, raw, forgetful=frozenset({"c"}))
    assert counts(summary, "upper") == (2, 0, 1, 0)
    assert counts(summary, "digest") == (2, 0, 0, 1)
    failure = summary.failures[0]
    assert failure.error_type == "MissingOutputError" and "up/c.txt" in failure.message


def test_a_missing_input_blocks_the_task(release, raw):
    (raw / "a.txt").unlink()
    summary = build(release, raw)
    assert counts(summary, "upper") == (2, 0, 0, 1)
    assert counts(summary, "digest") == (2, 0, 0, 1)
    assert summary.failures[0].message.startswith("missing input")
    assert not summary.ok


def test_a_failing_plan_ends_the_build(release, raw):
    def bad_plan(context):
        raise OSError("catalog not found")

    stages = [*two_stages(raw, NAMES)[:1], Stage(name="bad", description="", plan=bad_plan),
              *two_stages(raw, NAMES)[1:]]
    summary = Engine(release, local=True, progress=False).run(stages, release)
    assert not summary.ok
    assert [s.planned for s in summary.stages] == [True, False, False]
    assert summary.failures[0].key == "<plan>" and "catalog not found" in summary.text()


def test_stale_temporaries_are_removed_before_rerunning(release, raw):
    assert build(release, raw).ok
    stale = temporary_sibling(release / "up" / "a.txt")
    stale.write_text("half-written")
    # a task killed while writing its stamp leaves one in the stamps' folder
    stamp = next(p for p in (release / "work" / "stamps").rglob("*.json") if "a" in p.name)
    stale_stamp = temporary_sibling(stamp)
    stale_stamp.write_text("{")
    (raw / "a.txt").write_text("new\n")
    assert build(release, raw).ok
    assert not stale.exists() and not stale_stamp.exists()
    assert not list(release.rglob(".*.tmp-*"))


def test_a_swallowed_ctrl_c_still_stops_the_build(release):
    """A KeyboardInterrupt lost in a finaliser must not let the build run on: the engine stops
    after the task during which Ctrl-C came, and that task keeps its stamp."""
    def plan(context) -> list[Task]:
        return [Task(key=f"t{i}", func=swallowed_interrupt if i == 0 else done,
                     kwargs={"dst": str(context / "out" / f"{i}.txt")},
                     outputs=(Path("out") / f"{i}.txt",)) for i in range(3)]

    engine = Engine(release, local=True, progress=False)
    # pytest may run with SIGINT ignored (a background job of a shell without job control)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run([Stage(name="ctrl-c", description="swallowed Ctrl-C", plan=plan)],
                       release)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (release / "out" / "0.txt").is_file() and not (release / "out" / "1.txt").exists()
    assert len(list((release / "work" / "stamps" / "ctrl-c").glob("*.json"))) == 1


def test_paths_escaping_the_release_directory_are_refused(release, raw, tmp_path):
    for bad in ("../escape.txt", tmp_path / "escape.txt"):
        stage = Stage(name="s", description="", plan=lambda ctx, bad=bad: [
            Task(key="x", func=upper, kwargs={"src": str(raw / "a.txt"), "dst": str(bad)},
                 outputs=(bad,))])
        with pytest.raises(ReleasePathError, match="outside the release directory"):
            Engine(release, local=True, progress=False).run([stage], release)
    assert not (tmp_path / "escape.txt").exists()


def test_plans_are_checked(release, raw):
    twice = Stage(name="s", description="", plan=lambda ctx: [
        Task(key="x", func=forget, kwargs={"src": "", "dst": ""}),
        Task(key="x", func=forget, kwargs={"src": "", "dst": ""})])
    with pytest.raises(ValueError, match="two tasks with key 'x'"):
        Engine(release, local=True, progress=False).run([twice], release)
    with pytest.raises(ValueError, match="Stage name"):
        Stage(name="../x", description="", plan=lambda ctx: [])
    with pytest.raises(ValueError, match="workers"):
        Engine(release, workers=-1)
    assert 1 <= default_worker_count() <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="exclusive"):
        Engine(release, local=True, scheduler="tcp://127.0.0.1:8786")


def test_progress_bars_do_not_break_without_a_terminal(release, raw, monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    summary = build(release, raw, progress=True)
    assert summary.ok
    assert "upper" in capsys.readouterr().err


@pytest.fixture
def workers_import_tests(monkeypatch):
    """Worker processes import the toy task functions of ``engine_tasks`` by module name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_tasks_on_an_existing_cluster_in_worker_processes(release, raw, workers_import_tests):
    """Two worker processes; a failing task and one that kills its worker are isolated."""
    from distributed import LocalCluster

    stages = two_stages(raw, NAMES, fail=frozenset({"b"}))
    stages.append(Stage(name="die", description="a worker dies", plan=lambda ctx: [
        Task(key="die", func=os._exit, kwargs={"status": 3}, tile="t", band="B")]))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster:
        engine = Engine(release, scheduler=cluster.scheduler_address, progress=False)
        summary = engine.run(stages, release)
    assert counts(summary, "upper") == (2, 0, 1, 0), summary.text()
    assert counts(summary, "digest") == (2, 0, 0, 1), summary.text()
    assert counts(summary, "die") == (0, 0, 1, 0), summary.text()
    assert summary.failures[0].message == "cannot process b.txt", summary.text()
    assert summary.failures[2].error_type == "KilledWorker", summary.text()
    assert summary.failures[2].tile == "t"
    assert (release / "sha" / "a.sha").read_text() == \
        hashlib.sha256(b"INPUT A\n").hexdigest() + "\n"
    log_text = summary.log_file.read_text()
    assert "[upper/a/B (tile=a, band=B)] upper-casing a.txt" in log_text  # from a worker
    assert "KilledWorker" in log_text


def test_the_engine_starts_and_stops_its_own_local_cluster(release, raw, workers_import_tests):
    """The default back end, in this process: no warning (they are errors here), same results."""
    summary = build(release, raw, local=False, workers=1)
    assert summary.ok, summary.text()
    assert counts(summary, "digest") == (3, 0, 0, 0)
    reference = release.parent / "reference"
    assert build(reference, raw).ok
    assert [p.read_bytes() for p in sorted((release / "sha").iterdir())] == \
        [p.read_bytes() for p in sorted((reference / "sha").iterdir())]
    assert "starting a LocalCluster of 1 worker(s)" in summary.log_file.read_text()


def run_script(release: Path, count: int, delay: float, workers: int = 0, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(TESTS / "engine_build_script.py"), str(release), str(count),
         str(delay), str(workers)], start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, **kwargs)


def group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Wait until no process of the group is left (killed children are reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2], ids=["local", "LocalCluster"])
def test_a_build_killed_midway_and_rerun_equals_an_uninterrupted_build(tmp_path, workers):
    """SIGKILL of the whole process group (client, scheduler, workers) in the middle."""
    count, delay = 20, 0.2
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    clean = run_script(reference, count, delay)
    killed = run_script(interrupted, count, delay, workers)
    stamps = interrupted / "work" / "stamps" / "slow"
    deadline = time.monotonic() + 60
    while len(list(stamps.glob("*.json"))) < 5:
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.02)
    time.sleep(delay * 0.6)  # most likely in the middle of writing a file
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert group_gone(killed.pid)  # no worker outlived the kill
    done_at_kill = len(list(stamps.glob("*.json")))
    assert 5 <= done_at_kill < count
    assert len(list((interrupted / "out").iterdir())) < count

    rerun = run_script(interrupted, count, delay, workers)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    ran = int(out.decode().splitlines()[1].split()[1])
    assert ran == count - done_at_kill  # only what had no stamp
    out, err = clean.communicate(timeout=120)
    assert clean.returncode == 0, err.decode()

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted((root / "out").rglob("*")) if p.is_file()}

    assert files(interrupted) == files(reference)
    assert len(files(reference)) == count
    assert not list(interrupted.rglob(".*.tmp-*"))
    for stamp in stamps.glob("*.json"):
        assert json.loads(stamp.read_text())["format"] == 1


@pytest.mark.slow
def test_an_interrupted_build_closes_its_cluster(tmp_path):
    """Ctrl-C (SIGINT to the client only): the cluster shuts down, no worker is left behind."""
    release = tmp_path / "release"
    process = run_script(release, 40, 0.2, workers=2)
    stamps = release / "work" / "stamps" / "slow"
    deadline = time.monotonic() + 60
    while len(list(stamps.glob("*.json"))) < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and b"KeyboardInterrupt" in err
    assert group_gone(process.pid)
    assert len(list(stamps.glob("*.json"))) < 40
