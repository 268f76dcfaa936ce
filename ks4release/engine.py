"""The engine: named stages of independent per-tile/per-band tasks, run on Dask distributed.

A :class:`Stage` plans a list of :class:`Task` from the release context; :class:`Engine` runs the
stages in order and the tasks of one stage in parallel, on a ``LocalCluster`` sized to the
machine, on an existing cluster (``scheduler="tcp://host:port"``), or in this process one after
the other (``local=True``, for debugging with pdb and for fast tests: the same task wrapper
runs, only the submission differs).

Each task runs through :func:`_run_task`, which catches any exception and returns it as a
:class:`TaskFailure` record, checks that the declared outputs exist, and writes the task's stamp
(see :mod:`ks4release.stamps`). A rerun skips a task whose stamp matches and whose outputs exist,
and blocks (does not run) a task that reads an output of a failed or blocked task or a missing
file. A run ends with a :class:`RunSummary`; the command line exits non-zero when it is not
``ok``.

Task functions write their outputs themselves, with :func:`ks4release.atomic.atomic_path` or
:func:`ks4release.atomic.atomic_write_bytes`, so that nothing half-written looks finished; before
running tasks the engine removes stale temporary files left in their output folders by an
interrupted run. Only one build may run in a release directory at a time (not enforced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import ReleasePathError, clean_stale_temporaries, ensure_inside
from .stamps import (
    canonical,
    file_fingerprint,
    outputs_exist,
    read_stamp,
    safe_name,
    write_stamp,
)

__all__ = [
    "Engine",
    "ReleasePathError",
    "RunSummary",
    "Stage",
    "StageSummary",
    "Task",
    "TaskFailure",
    "default_worker_count",
]

log = logging.getLogger(__name__)

_STAGE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
#: Memory per worker assumed when sizing a LocalCluster to the machine.
_BYTES_PER_WORKER = 2 * 1024**3


@dataclass(frozen=True, kw_only=True)
class Task:
    """One independent unit of work of a stage.

    Parameters
    ----------
    key : str
        Unique within the stage, e.g. ``"0000.000-62/B"`` or an exposure stem.
    func : callable
        A module-level function (Dask pickles it by reference), called as ``func(**kwargs)``.
        It writes its outputs itself, atomically; its return value is ignored.
    kwargs : mapping
        Keyword arguments of ``func``. They go into the stamp through
        :func:`ks4release.stamps.canonical`: plain data, paths and dataclasses count by value,
        other objects only by type name.
    inputs : tuple of path
        Files (or folders) the task reads; relative paths are taken from the release directory.
        Their fingerprints go into the stamp. A missing input blocks the task.
    outputs : tuple of path
        Files the task must leave behind; relative paths are taken from the release directory,
        and every output must resolve inside it.
    params : mapping
        JSON-serialisable settings that also go into the stamp (e.g. configuration values the
        function reads from a file that is not among the inputs).
    stage : str
        Name of the stage; filled in by the engine when empty.
    tile, band : str or None
        For reports and logs.
    file : path or None
        The main input file, for reports and logs.
    """

    key: str
    func: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    stage: str = ""
    tile: str | None = None
    band: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"Task key must be a non-empty string, got {self.key!r}")
        if not callable(self.func):
            raise TypeError(f"Task func of {self.key!r} must be callable, got {self.func!r}")
        object.__setattr__(self, "inputs", tuple(Path(p) for p in self.inputs))
        object.__setattr__(self, "outputs", tuple(Path(p) for p in self.outputs))
        if self.file is not None:
            object.__setattr__(self, "file", Path(self.file))

    @property
    def label(self) -> str:
        """``stage/key`` with tile and band when known, for messages."""
        where = ", ".join(f"{n}={v}" for n, v in (("tile", self.tile), ("band", self.band)) if v)
        return f"{self.stage}/{self.key}" + (f" ({where})" if where else "")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A named step of the build.

    Parameters
    ----------
    name : str
        Short name (letters, digits, ``._-``), also the stamp folder name.
    description : str
        One line for logs and progress bars.
    plan : callable
        ``plan(context) -> list[Task]``; called only when the previous stage has finished, so it
        may look at the files that stage wrote.
    """

    name: str
    description: str
    plan: Callable[[Any], Sequence[Task]]

    def __post_init__(self) -> None:
        if not _STAGE_NAME.fullmatch(self.name or ""):
            raise ValueError(f"Stage name must use only letters, digits and '._+-': {self.name!r}")


@dataclass(frozen=True, kw_only=True)
class TaskFailure:
    """A task that failed (raised, lost its worker, left an output missing) or was blocked."""

    stage: str
    key: str
    tile: str | None
    band: str | None
    file: str | None
    error_type: str
    message: str
    traceback: str = ""
    blocked: bool = False

    def describe(self) -> str:
        """One line: where and what."""
        where = ", ".join(f"{n}={v}" for n, v in
                          (("tile", self.tile), ("band", self.band), ("file", self.file)) if v)
        kind = "blocked" if self.blocked else "FAILED"
        return (f"{kind} {self.stage}/{self.key}" + (f" [{where}]" if where else "")
                + f": {self.error_type}: {self.message}")


@dataclass(frozen=True, kw_only=True)
class StageSummary:
    """Counts of one stage: ran (and succeeded), skipped as up to date, failed, blocked."""

    name: str
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    blocked: int = 0
    elapsed_s: float = 0.0
    planned: bool = True

    @property
    def total(self) -> int:
        return self.ran + self.skipped + self.failed + self.blocked


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """The outcome of :meth:`Engine.run`."""

    stages: tuple[StageSummary, ...]
    failures: tuple[TaskFailure, ...]
    elapsed_s: float
    log_file: Path | None = None

    @property
    def ok(self) -> bool:
        """True when every stage was planned and no task failed or was blocked."""
        return not self.failures and all(s.planned for s in self.stages)

    def stage(self, name: str) -> StageSummary:
        """The summary of the stage called ``name``."""
        for summary in self.stages:
            if summary.name == name:
                return summary
        raise KeyError(name)

    def text(self) -> str:
        """A human-readable rendering: a table of counts, then every failure."""
        lines = [f"{'stage':<24} {'ran':>6} {'skipped':>8} {'failed':>7} {'blocked':>8} "
                 f"{'time':>9}"]
        for s in self.stages:
            if not s.planned:
                lines.append(f"{s.name:<24} (not run)")
                continue
            lines.append(f"{s.name:<24} {s.ran:>6} {s.skipped:>8} {s.failed:>7} {s.blocked:>8} "
                         f"{s.elapsed_s:>8.1f}s")
        status = "OK" if self.ok else f"FAILED ({len(self.failures)} problem(s))"
        lines.append(f"build {status} in {self.elapsed_s:.1f}s"
                     + (f"; log: {self.log_file}" if self.log_file else ""))
        lines.extend(f"  {f.describe()}" for f in self.failures)
        return "\n".join(lines)

    __str__ = text

    def render(self) -> Any:
        """The summary as a rich renderable (a table of counts, then every failure)."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="build summary", title_justify="left")
        table.add_column("stage")
        for column in ("ran", "skipped", "failed", "blocked", "time"):
            table.add_column(column, justify="right")
        for s in self.stages:
            if not s.planned:
                table.add_row(s.name, "-", "-", "-", "-", "not run", style="dim")
                continue
            table.add_row(s.name, str(s.ran), str(s.skipped),
                          Text(str(s.failed), style="bold red" if s.failed else ""),
                          Text(str(s.blocked), style="yellow" if s.blocked else ""),
                          f"{s.elapsed_s:.1f}s")
        status = (Text("build OK", style="bold green") if self.ok else
                  Text(f"build FAILED ({len(self.failures)} problem(s))", style="bold red"))
        status.append(f" in {self.elapsed_s:.1f}s")
        if self.log_file:
            status.append(f"; log: {self.log_file}")
        lines = [Text(f"  {f.describe()}", style="yellow" if f.blocked else "red")
                 for f in self.failures]
        return Group(table, status, *lines)


# ----------------------------------------------------------------------------------------------
# What runs on a worker


@dataclass(frozen=True)
class _Outcome:
    key: str
    failure: TaskFailure | None
    duration_s: float
    #: ``(level, logger name, message)`` of ks4release log records emitted on a remote worker.
    records: tuple[tuple[int, str, str], ...] = ()


class _Capture(logging.Handler):
    """Collects the ks4release log records of one task thread on a worker process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append((record.levelno, record.name, record.getMessage()))


@contextlib.contextmanager
def _captured_logs(enabled: bool) -> Iterator[_Capture | None]:
    if not enabled:
        yield None
        return
    package_logger = logging.getLogger("ks4release")
    capture = _Capture()
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)  # a worker process: nobody else configures it
    package_logger.addHandler(capture)
    try:
        yield capture
    finally:
        package_logger.removeHandler(capture)


def _failure(task: Task, error_type: str, message: str, tb: str = "", *,
             blocked: bool = False) -> TaskFailure:
    return TaskFailure(stage=task.stage, key=task.key, tile=task.tile, band=task.band,
                       file=None if task.file is None else os.fspath(task.file),
                       error_type=error_type, message=message, traceback=tb, blocked=blocked)


def _run_task(task: Task, outputs: tuple[Path, ...], stamp: Path,
              fingerprint: Mapping[str, Any], capture_logs: bool = False) -> _Outcome:
    """Run one task; never raises an ``Exception`` (it becomes a failure record).

    ``outputs`` are the task's resolved outputs; ``fingerprint`` was computed before the run, so
    an input modified while the task ran makes the next run redo it. With ``capture_logs`` (on
    worker processes) the task's ks4release log records travel back in the outcome, for the
    build log.
    """
    start = time.monotonic()
    with _captured_logs(capture_logs) as capture:
        failure = _call(task, outputs, stamp, fingerprint, start)
    records = tuple(capture.records) if capture is not None else ()
    return _Outcome(task.key, failure, time.monotonic() - start, records)


def _call_logging_warnings(task: Task) -> None:
    """Call the task; every Python warning it raises goes to the build log, naming the task.

    A warning (say, no dust map configured) is worth a line in the log, not a failed task, and
    a worker process's stderr is not where anyone looks.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task.func(**task.kwargs)
    for warning in caught:
        log.warning("%s: %s: %s", task.label, warning.category.__name__, warning.message)


def _call(task: Task, outputs: tuple[Path, ...], stamp: Path, fingerprint: Mapping[str, Any],
          start: float) -> TaskFailure | None:
    with contextlib.suppress(FileNotFoundError):
        stamp.unlink()  # the old stamp no longer describes what is on disk
    try:
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
        _call_logging_warnings(task)
        missing = [os.fspath(p) for p in outputs if not os.path.lexists(p)]
        if missing:
            return _failure(task, "MissingOutputError",
                            f"the task returned without writing {len(missing)} declared "
                            "output(s): " + ", ".join(missing))
        finished = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        write_stamp(stamp, fingerprint, finished_utc=finished,
                    duration_s=time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - every task error becomes a record
        return _failure(task, type(exc).__qualname__, str(exc), traceback.format_exc())
    return None


# ----------------------------------------------------------------------------------------------
# The engine


def default_worker_count() -> int:
    """Workers for a LocalCluster: one per core, fewer when memory is short (2 GiB each)."""
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, memory // _BYTES_PER_WORKER))


@dataclass
class _Prepared:
    task: Task
    outputs: tuple[Path, ...]
    stamp: Path
    fingerprint: dict[str, Any]


@contextlib.contextmanager
def _sigint_latch() -> Iterator[threading.Event]:
    """An event that Ctrl-C sets, besides raising KeyboardInterrupt as usual.

    Python drops an exception raised while a finaliser runs (a ``__del__`` method, a weakref
    callback; Dask's client runs many), so a Ctrl-C can vanish and the build go on to the end.
    The engine checks the event after every task and stops there. Installed only in the main
    thread and over Python's default handler, which it restores.
    """
    event = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        event.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Engine:
    """Runs stages of tasks on Dask distributed, with stamps, atomic outputs and a log file.

    Parameters
    ----------
    release_dir : path
        The release directory; outputs and stamps must lie inside it. Stamps go to
        ``work/stamps/<stage>/``, the log to ``logs/build-<UTC time>.log``.
    workers : int or None
        Worker processes of the LocalCluster; None or 0 sizes it to the machine
        (:func:`default_worker_count`). Ignored with ``scheduler`` or ``local``.
    threads_per_worker : int
        Threads per LocalCluster worker.
    scheduler : str or None
        Address of an existing Dask scheduler (``tcp://host:port``) to use instead of starting a
        LocalCluster. Its workers must see the release directory at the same path.
    local : bool
        Run every task in this process, one after the other (debugging, fast tests).
    progress : bool
        Show rich progress bars (on standard error).
    memory_limit : str
        Memory limit per LocalCluster worker (Dask syntax, ``"auto"`` divides the machine).
    """

    def __init__(self, release_dir: os.PathLike[str] | str, *, workers: int | None = None,
                 threads_per_worker: int = 1, scheduler: str | None = None, local: bool = False,
                 progress: bool = True, memory_limit: str = "auto") -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (0 or None: sized to the machine), got "
                             f"{workers}")
        if threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
        if local and scheduler:
            raise ValueError("local=True and scheduler are exclusive")
        self.release_dir = Path(release_dir).resolve()
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.scheduler = scheduler
        self.local = local
        self.progress = progress
        self.memory_limit = memory_limit

    # -- paths ---------------------------------------------------------------------------------

    def stamp_path(self, stage: str, key: str) -> Path:
        """Where the stamp of task ``key`` of ``stage`` lives."""
        return ensure_inside(Path("work", "stamps", stage, safe_name(key) + ".json"),
                             self.release_dir, what=f"stamp of {stage}/{key}")

    # -- running -------------------------------------------------------------------------------

    def run(self, stages: Sequence[Stage], context: Any) -> RunSummary:
        """Plan and run ``stages`` in order; return the summary (never raises for task errors).

        Raises
        ------
        ValueError, TypeError
            For two stages of one name, a plan returning something else than tasks, two tasks
            of one key in a stage, or two tasks of a stage declaring the same output (errors in
            the plan's code, not in the data: an exception raised *by* a plan is recorded in
            the summary instead, and ends the build).
        ReleasePathError
            When an output of a task resolves outside the release directory.
        KeyboardInterrupt
            Passed on after the cluster is closed; finished tasks keep their stamps.
        """
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        start = time.monotonic()
        self.release_dir.mkdir(parents=True, exist_ok=True)
        with self._log_file() as log_file, _sigint_latch() as interrupted, \
                self._executor() as submit, self._progress() as bars:
            log.info("build of %s: stages %s (ks4release %s)", self.release_dir,
                     ", ".join(names), __version__)
            summaries: list[StageSummary] = []
            failures: list[TaskFailure] = []
            bad_paths: set[Path] = set()  # outputs of failed or blocked tasks
            for index, stage in enumerate(stages):
                log.info("stage %s: %s", stage.name, stage.description)
                try:
                    tasks = list(stage.plan(context))
                except Exception as exc:  # noqa: BLE001 - a plan error ends the build
                    log.error("planning stage %s failed: %s", stage.name, exc, exc_info=True)
                    failures.append(TaskFailure(
                        stage=stage.name, key="<plan>", tile=None, band=None, file=None,
                        error_type=type(exc).__qualname__, message=str(exc),
                        traceback=traceback.format_exc()))
                    summaries.extend(StageSummary(name=s.name, planned=False)
                                     for s in stages[index:])
                    break
                try:
                    summaries.append(self._run_stage(stage, tasks, submit, bars, failures,
                                                     bad_paths, interrupted))
                except KeyboardInterrupt:
                    log.error("build interrupted during stage %s; finished tasks keep their "
                              "stamps, a rerun continues from there", stage.name)
                    raise
            result = RunSummary(stages=tuple(summaries), failures=tuple(failures),
                                elapsed_s=time.monotonic() - start, log_file=log_file)
            for line in result.text().splitlines():
                (log.info if result.ok else log.error)("%s", line)
        return result

    def _prepare(self, stage: Stage, tasks: Sequence[Task]) -> list[_Prepared]:
        keys: set[str] = set()
        owners: dict[Path, str] = {}
        prepared = []
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(f"stage {stage.name} planned a {type(task).__name__}, not a Task")
            if task.stage and task.stage != stage.name:
                raise ValueError(f"task {task.key!r} names stage {task.stage!r} but was planned "
                                 f"by stage {stage.name!r}")
            task = dataclasses.replace(task, stage=stage.name)
            if task.key in keys:
                raise ValueError(f"stage {stage.name} planned two tasks with key {task.key!r}")
            keys.add(task.key)
            outputs = tuple(ensure_inside(p, self.release_dir, what=f"output of {task.label}")
                            for p in task.outputs)
            for path in outputs:
                if path in owners:
                    raise ValueError(f"{path} is an output of both {owners[path]!r} and "
                                     f"{task.key!r} in stage {stage.name}")
                owners[path] = task.key
            fingerprint = {
                "stage": stage.name, "key": task.key,
                "func": f"{task.func.__module__}:{task.func.__qualname__}",
                "code_version": __version__,
                "params": self._relative(canonical(task.params)),
                "kwargs": self._relative(canonical(task.kwargs)),
                "inputs": [],
                "outputs": [p.relative_to(self.release_dir).as_posix() for p in outputs],
            }
            prepared.append(_Prepared(task, outputs, self.stamp_path(stage.name, task.key),
                                      fingerprint))
        return prepared

    def _run_stage(self, stage: Stage, tasks: list[Task], submit, bars,
                   failures: list[TaskFailure], bad_paths: set[Path],
                   interrupted: threading.Event) -> StageSummary:
        start = time.monotonic()
        prepared = self._prepare(stage, tasks)
        bar = bars.add_task(stage.name, total=len(prepared)) if bars is not None else None
        counts = {"ran": 0, "skipped": 0, "failed": 0, "blocked": 0}

        def advance() -> None:
            if bars is not None:
                bars.advance(bar)

        to_run: list[_Prepared] = []
        for item in prepared:
            task = item.task
            problem = self._check_inputs(item, bad_paths)
            if problem is not None:
                failure = _failure(task, "Blocked", problem, blocked=True)
                failures.append(failure)
                bad_paths.update(item.outputs)
                counts["blocked"] += 1
                log.warning("blocked %s: %s", task.label, problem)
                advance()
                continue
            old = read_stamp(item.stamp)
            if (old is not None and old.get("fingerprint") == item.fingerprint
                    and outputs_exist(item.outputs)):
                counts["skipped"] += 1
                log.info("up to date %s", task.label)
                advance()
                continue
            to_run.append(item)

        # the stamps' folders too: a task killed while writing its stamp leaves a temporary
        removed = clean_stale_temporaries(p.parent for item in to_run
                                          for p in (*item.outputs, item.stamp))
        for path in removed:
            log.info("removed stale temporary %s", path)
        by_key = {item.task.key: item for item in to_run}
        for item in to_run:
            log.info("queued %s%s", item.task.label,
                     f" file={item.task.file}" if item.task.file else "")
        for key, outcome in submit(to_run):
            item = by_key[key]
            for level, name, message in outcome.records:
                logging.getLogger(name).log(level, "[%s] %s", item.task.label, message)
            if outcome.failure is None:
                counts["ran"] += 1
                log.info("done %s in %.2fs", item.task.label, outcome.duration_s)
            else:
                counts["failed"] += 1
                failures.append(outcome.failure)
                bad_paths.update(item.outputs)
                log.error("%s\n%s", outcome.failure.describe(), outcome.failure.traceback.rstrip())
            advance()
            if interrupted.is_set():
                raise KeyboardInterrupt("Ctrl-C during the build")
        return StageSummary(name=stage.name, elapsed_s=time.monotonic() - start, **counts)

    def _relative(self, value: Any) -> Any:
        """Paths in canonical data made relative to the release (``$RELEASE/...``), so that a
        moved release directory keeps its stamps."""
        if isinstance(value, str):
            root = os.fspath(self.release_dir)
            if value == root or value.startswith(root + os.sep):
                return "$RELEASE" + value[len(root):]
            return value
        if isinstance(value, list):
            return [self._relative(v) for v in value]
        if isinstance(value, dict):
            return {k: self._relative(v) for k, v in value.items()}
        return value

    def _check_inputs(self, item: _Prepared, bad_paths: set[Path]) -> str | None:
        """Fill the input fingerprints of ``item``; return why it cannot run, or None."""
        records = []
        for raw in item.task.inputs:
            path = (self.release_dir / raw).resolve()
            if path in bad_paths:
                return f"upstream failed: input {path} is an output of a failed or blocked task"
            try:
                records.append(file_fingerprint(path, self.release_dir))
            except FileNotFoundError:
                return f"missing input {path}"
        item.fingerprint["inputs"] = records
        return None

    # -- execution back ends -------------------------------------------------------------------

    @contextlib.contextmanager
    def _executor(self) -> Iterator[Callable[[list[_Prepared]], Iterator[tuple[str, _Outcome]]]]:
        if self.local:
            def submit_local(items: list[_Prepared]) -> Iterator[tuple[str, _Outcome]]:
                for item in items:
                    yield item.task.key, _run_task(item.task, item.outputs, item.stamp,
                                                   item.fingerprint)
            yield submit_local
            return
        with self._client() as client:
            yield lambda items: self._submit_dask(client, items)

    @contextlib.contextmanager
    def _client(self):
        from distributed import Client, LocalCluster

        for name in ("distributed", "distributed.worker", "distributed.scheduler",
                     "distributed.nanny", "distributed.core"):
            if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)
        if self.scheduler:
            log.info("connecting to the Dask scheduler at %s", self.scheduler)
            with Client(self.scheduler) as client:
                yield client
            return
        n_workers = self.workers or default_worker_count()  # 0 or None: automatic
        log.info("starting a LocalCluster of %d worker(s) x %d thread(s)", n_workers,
                 self.threads_per_worker)
        # The scheduler serves HTTP (/metrics) even without a dashboard, on port 8787 unless
        # told otherwise; ":0" takes a free port so concurrent builds never collide.
        with LocalCluster(n_workers=n_workers, threads_per_worker=self.threads_per_worker,
                          processes=True, dashboard_address=":0", memory_limit=self.memory_limit,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client

    @staticmethod
    def _submit_dask(client, items: list[_Prepared]) -> Iterator[tuple[str, _Outcome]]:
        from distributed import as_completed

        futures = {}
        for item in items:
            future = client.submit(_run_task, item.task, item.outputs, item.stamp,
                                   item.fingerprint, True, pure=False,
                                   key=f"{item.task.stage}-{safe_name(item.task.key)}-"
                                       f"{os.urandom(4).hex()}")
            futures[future] = item
        try:
            for future in as_completed(futures):
                item = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a lost worker, a cancelled task
                    outcome = _Outcome(item.task.key, _failure(
                        item.task, type(exc).__qualname__,
                        f"the task did not complete on Dask: {exc}",
                        "".join(traceback.format_exception(exc))), math.nan)
                yield item.task.key, outcome
        finally:
            client.cancel(list(futures))

    # -- log file and progress ------------------------------------------------------------------

    @contextlib.contextmanager
    def _log_file(self) -> Iterator[Path]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = ensure_inside(Path("logs", f"build-{stamp}.log"), self.release_dir, what="log")
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        package_logger = logging.getLogger("ks4release")
        old_level = package_logger.level
        if package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        package_logger.addHandler(handler)
        try:
            yield path
        finally:
            package_logger.removeHandler(handler)
            package_logger.setLevel(old_level)
            handler.close()

    @contextlib.contextmanager
    def _progress(self):
        if not self.progress:
            yield None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=sys.stderr)
        with Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as bars:
            yield bars
