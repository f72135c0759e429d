"""Where tile tasks run: in this process, in a local process pool, or on a Dask cluster.

A tile task (load, align and stack one group into a master tile) is a picklable task object and
a module-level function ``fn(task, ctx)``. :func:`make_executor` picks where it runs from the
configuration: ``dask_scheduler`` names a ``dask.distributed`` scheduler (``local`` starts a
``LocalCluster`` on this machine), otherwise ``num_processing_workers`` processes of a local pool
(0 = one per core), or this process when that is 1 or when a single task is to run.

Every executor runs the same function on the same pickled task, so the result does not depend
on where it ran: in this process the task goes through the same pickle round trip as on its way
to a worker. An executor's ``run`` yields a :class:`TaskOutcome` per task as tasks finish and
stops between tasks on cancel. A task that raises :class:`TaskError` (it cannot give its result
for a reason of its input) becomes a failed task with its reason in words; any other exception is
a bug and propagates, which stops the run (tasks still running are waited for, pending ones
dropped); worker processes that died raise :class:`WorkersLost`.

Tile tasks running at once on one machine share its RAM budget for their aligned stacks
(:func:`allocate_stack`): a stack beyond its share goes to a disk-backed cache.

Workers in other processes cannot see the caller's ``threading.Event``: cancellation reaches them
as a flag file in a folder they share with the caller (the output folder, which they write the
tiles to anyway), checked between frames. Their log records are collected and re-emitted here, so
the run log holds them whatever ran the task.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import errno
import logging
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from zemosaic_utils import usable_cores

logger = logging.getLogger(__name__)

LOCAL_CLUSTER = "local"
# What a pool's forkserver imports once, so that every worker it forks starts with the pipeline.
_POOL_PRELOAD = ("zemosaic_worker",)
# How often a waiting caller looks at its cancel event while tasks run elsewhere.
_POLL_S = 0.2


class WorkersLost(Exception):
    """The worker processes stopped: killed (out of memory) or unable to start."""


class TaskError(Exception):
    """A task that cannot give its result for a reason of its input; ``str(e)`` says why.

    The executor reports it as a failed task and runs the others; any other exception a task
    raises stops the run.
    """


class Cancelled(Exception):
    """The run was cancelled by the user."""


class NoDiskSpace(Exception):
    """A tile's disk-backed stack does not fit on its disk; ``str(e)`` says how much it needs."""


def _no_room(cache_dir: str, nbytes: int, free: int) -> NoDiskSpace:
    return NoDiskSpace(f"the aligned stack of a tile needs {nbytes / 2**30:.1f} GB of disk cache in "
                       f"{cache_dir}, which has {free / 2**30:.1f} GB free: free some space, put "
                       "output_folder on a larger disk, or cap the frames of a tile "
                       "(max_raw_per_master_tile)")


def resolve_workers(requested: int) -> int:
    """Return the number of worker processes for ``num_processing_workers`` (0 = one per usable core)."""
    return requested if requested > 0 else usable_cores()


#: Largest aligned stack kept in RAM (bytes). A larger one goes to a :class:`DiskStack`, which
#: the stacking reads a block of rows at a time: from the OS page cache while RAM is plentiful,
#: at the cost of a few memory copies, so the process's memory stays about the same however
#: many frames a group has instead of holding the whole stack.
STACK_RAM_MAX = 2**30


def stack_ram_budget() -> int:
    """Return the bytes an aligned stack may take in RAM: 40 % of the memory available now, at
    most :data:`STACK_RAM_MAX`.

    Larger stacks go to a disk-backed cache in the output folder; when /proc is unreadable the
    budget is :data:`STACK_RAM_MAX`.
    """
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return min(STACK_RAM_MAX, int(line.split()[1]) * 1024 * 2 // 5)
    except OSError:
        pass
    return STACK_RAM_MAX


def allocate_stack(shape, cache_dir: str, ram_share: int = 1, dtype=np.float32):
    """Return a stack of ``shape`` (float32 unless ``dtype``): an array in RAM, or a :class:`DiskStack`
    when too large.

    ``ram_share`` stacks may be built at once on this machine (parallel tile tasks): each gets
    that share of the RAM budget.
    """
    return allocate_stacks([(shape, dtype)], cache_dir, ram_share)[0]


def allocate_stacks(layouts, cache_dir: str, ram_share: int = 1) -> list:
    """Return a stack per ``(shape, dtype)`` of ``layouts``, all in RAM or all on disk: one tile's share.

    The stacks of one tile (its aligned frames and their pixel weights, say) are used together,
    so their bytes together decide; on disk each has a file of its own.
    """
    layouts = [(tuple(int(v) for v in shape), np.dtype(dtype)) for shape, dtype in layouts]
    nbytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in layouts)
    if nbytes <= stack_ram_budget() // max(1, ram_share):
        return [np.empty(shape, dtype) for shape, dtype in layouts]
    os.makedirs(cache_dir, exist_ok=True)
    # The file fills as frames are aligned: a stack that cannot fit stops the run now, not after
    # minutes of aligning (one that fits now may still meet a disk others fill: see _StackFile).
    free = shutil.disk_usage(cache_dir).free
    if free < nbytes:
        raise _no_room(cache_dir, nbytes, free)
    logger.info("Aligned stack of %.1f GB goes to a disk cache in %s", nbytes / 2**30, cache_dir)
    return [DiskStack.create(cache_dir, shape, dtype) for shape, dtype in layouts]


def release_stack(stack) -> None:
    """Delete the file behind a disk-backed stack (any view of it)."""
    if isinstance(stack, DiskStack):
        stack.close()


class _StackFile:
    """The file of a :class:`DiskStack`: positional reads and writes under one lock (frames are
    written by several threads at once)."""

    def __init__(self, path: str, shape: tuple, dtype=np.float32):
        self.path, self.shape, self.dtype = path, tuple(int(v) for v in shape), np.dtype(dtype)
        self.handle = open(path, "r+b", buffering=0)
        self.lock = threading.Lock()

    def row_offset(self, frame: int, row: int) -> int:
        _n, h, w, c = self.shape
        return ((frame * h + row) * w * c) * self.dtype.itemsize

    def write(self, offset: int, data: np.ndarray) -> None:
        """Write ``data`` at ``offset``; a full disk raises :class:`NoDiskSpace`."""
        with self.lock:
            self.handle.seek(offset)
            try:
                self.handle.write(memoryview(np.ascontiguousarray(data, self.dtype)).cast("B"))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise _no_room(os.path.dirname(self.path), int(np.prod(self.shape)) * self.dtype.itemsize,
                               shutil.disk_usage(os.path.dirname(self.path)).free) from exc

    def read_into(self, offset: int, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        with self.lock:
            self.handle.seek(offset)
            done = 0
            while done < len(view):
                got = self.handle.readinto(view[done:])
                if not got:
                    raise OSError(f"{self.path} ended before the stack's data")
                done += got


class StackLike:
    """What an ``(N, H, W, C)`` stack that is not an array answers besides its ``shape``: its dtype
    (float32 unless it says otherwise), its dimensions and its frame count (a disk-backed stack, a
    measurement view)."""

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]


class DiskStack(StackLike):
    """An ``(N, H, W, C)`` stack (float32 unless created otherwise) kept in a file and moved with
    explicit reads and writes.

    A memory map would count every page it touches in the process's resident memory until it is
    unmapped; read and written explicitly, the stack's pages stay in the OS page cache, which the
    OS reclaims as it needs, and the process holds only what it reads (a block of rows, a frame).
    While RAM is plentiful the reads are memory copies.

    The accesses the stacking makes: ``stack[i] = frame`` writes a frame, ``stack[i]`` reads one
    (an array); slices (``stack[:n]``, ``stack[:, y0:y1, x0:x1]``) are views of the same file, and
    an array of a view (``np.asarray(stack[:, r0:r1])``) reads it.
    """

    def __init__(self, store: _StackFile, frames: range, rows: range, cols: range):
        self._store, self._frames, self._rows, self._cols = store, frames, rows, cols

    @classmethod
    def create(cls, folder: str, shape, dtype=np.float32) -> "DiskStack":
        """Return a new stack of ``shape`` and ``dtype`` in a temporary file of ``folder``."""
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".stack_", suffix=".tmp", delete=False)
        with handle:
            handle.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        store = _StackFile(handle.name, shape, dtype)
        n, h, w, _c = store.shape
        return cls(store, range(n), range(h), range(w))

    @property
    def shape(self) -> tuple:
        return (len(self._frames), len(self._rows), len(self._cols), self._store.shape[3])

    @property
    def dtype(self):
        return self._store.dtype

    def _window(self, key) -> "DiskStack":
        """Return the view of ``key``: a tuple of up to three unit-step slices (frames, rows, cols)."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"a disk-backed stack takes a frame index or slices, not {key!r}")
        if any(k.step not in (None, 1) for k in key):
            raise IndexError("a disk-backed stack takes unit-step slices only")
        ranges = [self._frames, self._rows, self._cols]
        for axis, k in enumerate(key):
            ranges[axis] = ranges[axis][k]
        return DiskStack(self._store, *ranges)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return np.asarray(self._window((slice(int(key), int(key) + 1 or None),)))[0]
        return self._window(key)

    def __setitem__(self, index, frame) -> None:
        if not isinstance(index, (int, np.integer)):
            raise IndexError("a disk-backed stack is written one frame at a time")
        frame = np.asarray(frame, self.dtype)
        if frame.shape != self.shape[1:]:
            raise ValueError(f"frame of shape {frame.shape} for a stack of {self.shape}")
        f = self._frames[index]
        full_width = len(self._cols) == self._store.shape[2]
        if full_width:
            self._store.write(self._store.row_offset(f, self._rows.start), frame)
            return
        for k, row in enumerate(self._rows):
            self._store.write(self._store.row_offset(f, row) + self._cols.start * frame.shape[2] * self.dtype.itemsize,
                              frame[k])

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, self.dtype)
        full_width = len(self._cols) == self._store.shape[2]
        rows = len(self._rows)
        if rows and len(self._cols):
            buffer = None if full_width else np.empty((rows, self._store.shape[2], self.shape[3]), self.dtype)
            for k, f in enumerate(self._frames):
                offset = self._store.row_offset(f, self._rows.start)
                if full_width:
                    self._store.read_into(offset, out[k])
                else:
                    self._store.read_into(offset, buffer)
                    out[k] = buffer[:, self._cols.start:self._cols.stop]
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        """Close and delete the stack's file (every view of it becomes unusable)."""
        store = self._store
        if not store.handle.closed:
            store.handle.close()
        try:
            os.remove(store.path)
        except OSError:
            pass


class CheckedStack:
    """A read-only view of an aligned stack (an array or a :class:`DiskStack`) that calls
    ``check()`` before every read: a tile's cancel check.

    Every step after the alignment reads the stack through indexing, a frame (``stack[i]``) or a
    block of rows (``stack[:, r0:r1]``) at a time, so a cancelled tile stops at its next frame or
    block, without each step taking a callback.
    """

    def __init__(self, stack, check):
        self._stack, self._check = stack, check

    @property
    def shape(self) -> tuple:
        return tuple(self._stack.shape)

    @property
    def dtype(self):
        return self._stack.dtype

    @property
    def ndim(self) -> int:
        return self._stack.ndim

    def __len__(self) -> int:
        return len(self._stack)

    def __getitem__(self, key):
        self._check()
        return self._stack[key]


class CancelFlag:
    """A cancellation flag visible to worker processes on any machine that shares ``path``'s folder."""

    def __init__(self, path: str):
        self.path = path

    def set(self) -> None:
        """Raise the flag (workers stop at their next check)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w"):
            pass

    def clear(self) -> None:
        """Lower the flag."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def is_set(self) -> bool:
        """Return True once the flag is raised."""
        return os.path.exists(self.path)


class WorkerContext:
    """The ``ctx`` a task gets in a worker: cancellation from a :class:`CancelFlag`, no progress.

    Progress of tasks run elsewhere is reported by the caller, one step per finished task.
    """

    def __init__(self, cancel_flag: str | None):
        self._flag = CancelFlag(cancel_flag) if cancel_flag else None

    def advance(self, phase, done, total, message=""):
        """Progress inside a task run elsewhere is not reported (see the class doc)."""

    def check_cancel(self):
        """Raise :class:`Cancelled` when the caller raised the cancel flag."""
        if self._flag is not None and self._flag.is_set():
            raise Cancelled("cancelled by user")


class _LogCollector(logging.Handler):
    """Keeps this project's log records, made picklable, for the caller to re-emit."""

    def __init__(self, level):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.name.startswith("zemosaic"):
            record.msg, record.args = record.getMessage(), None
            record.exc_info = record.exc_text = None
            self.records.append(record)


def _call_in_worker(fn, payload: bytes, cancel_flag: str | None, caller_pid: int, log_level: int):
    """Worker side: unpickle the task, run it; returns ``(result, log records)``.

    In the caller's own process (a threaded Dask cluster) its log records already reach the
    caller's handlers and are not collected.
    """
    task = pickle.loads(payload)
    ctx = WorkerContext(cancel_flag)
    ctx.check_cancel()  # a task that starts after a cancel (one Dask had queued) ends at once
    if os.getpid() == caller_pid:
        return fn(task, ctx), []
    collector = _LogCollector(log_level)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(collector)
    root.setLevel(min(saved_level or logging.WARNING, log_level))
    try:
        return fn(task, ctx), collector.records
    finally:
        root.removeHandler(collector)
        root.setLevel(saved_level)


@dataclass
class TaskOutcome:
    """One finished task: its position in the task list, its result, or why it failed."""

    index: int
    result: object = None
    error: str | None = None


class InProcessExecutor:
    """Runs tasks one after the other in this process, with per-frame progress and cancel."""

    name = "in-process"
    workers = 1
    memory_share = 1

    def run(self, fn, tasks, ctx, cancel_flag=None):
        """Yield a :class:`TaskOutcome` per task, in order; ``ctx`` (the caller's context) gives
        the task per-frame progress and cancel, so ``cancel_flag`` is not needed here."""
        for i, task in enumerate(tasks):
            ctx.check_cancel()
            # The same bytes a worker would get: the result never depends on where it ran.
            local = pickle.loads(pickle.dumps(task))
            try:
                result = fn(local, ctx)
            except TaskError as exc:
                yield TaskOutcome(i, error=_reason(exc))
                continue
            yield TaskOutcome(i, result=result)

    def close(self):
        """Nothing to release."""


class _FutureExecutor:
    """Shared part of the pool and Dask executors: submit every task, collect as they finish."""

    name = "?"
    workers = 1
    memory_share = 1
    # What a task's future raises when the worker processes themselves are gone.
    lost_errors: tuple = ()

    def _submit(self, call, *args):
        raise NotImplementedError

    def _as_completed(self, futures, timeout):
        raise NotImplementedError

    def _cancel_pending(self, futures):
        for f in futures:
            f.cancel()

    def run(self, fn, tasks, ctx, cancel_flag: CancelFlag):
        """Yield a :class:`TaskOutcome` per task as tasks finish.

        ``ctx.check_cancel`` is polled while waiting. On cancel (or any exception here, such as
        Ctrl-C) the flag is raised: tasks not started are dropped, running ones stop at their
        next check and are waited for, so no worker writes into the output folder after the run
        has ended. The tasks that finished meanwhile are still yielded (their files exist: the
        caller records them), then the exception goes on.
        """
        level = logging.getLogger("zemosaic_worker").getEffectiveLevel()
        cancel_flag.clear()
        futures = {self._submit(_call_in_worker, fn, pickle.dumps(task), cancel_flag.path,
                                os.getpid(), level): i for i, task in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                ctx.check_cancel()
                for future in self._as_completed(pending, _POLL_S):
                    pending.discard(future)
                    yield self._outcome(futures[future], future)
        except GeneratorExit:  # the caller stopped iterating: nothing more can be handed over
            self._stop(cancel_flag, pending)
            raise
        except BaseException:
            self._stop(cancel_flag, pending)
            for future in pending:
                outcome = self._finished_while_stopping(futures[future], future)
                if outcome is not None:
                    yield outcome
            raise
        finally:
            cancel_flag.clear()

    def _stop(self, cancel_flag: CancelFlag, pending) -> None:
        """Raise the flag, drop the tasks not started and wait for the running ones."""
        cancel_flag.set()
        self._cancel_pending(pending)
        self._wait_quietly(pending)

    def _finished_while_stopping(self, index, future) -> TaskOutcome | None:
        """Return the outcome of a task that ran to its end while the run stopped, None for one
        dropped or stopped by the cancel (or by Ctrl-C, which reaches the local workers too)."""
        if future.cancelled():
            return None
        try:
            return self._outcome(index, future)
        except (Cancelled, KeyboardInterrupt, WorkersLost):
            return None

    def _outcome(self, index, future) -> TaskOutcome:
        """Return a finished future's outcome; a worker's error other than :class:`TaskError`
        propagates with its traceback (the worker's, as the cause), lost workers as
        :class:`WorkersLost`."""
        try:
            result, records = future.result()
        except TaskError as exc:
            return TaskOutcome(index, error=_reason(exc))
        except self.lost_errors as exc:  # no task can run any more
            raise WorkersLost(_reason(exc)) from exc
        for record in records:
            logging.getLogger(record.name).handle(record)
        return TaskOutcome(index, result=result)

    def _wait_quietly(self, futures):
        raise NotImplementedError


def _is_alive(pid: int) -> bool:
    """Return True while process ``pid`` runs (a zombie, killed but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the pid now belongs to another user's process
            return False
        return True


def _use_callers_modules(sys_path: list, modules: dict) -> None:
    """Make this worker import the project's modules from where the caller imported them.

    Python 3.11's forkserver preloads modules with its own default ``sys.path`` (it ignores the
    caller's), so a caller that found the modules through a path it added at run time (a source
    checkout beside an installed copy) would get workers running the other copy's code.
    """
    sys.path[:] = sys_path
    stale = [name for name, path in modules.items()
             if name in sys.modules and getattr(sys.modules[name], "__file__", None) != path]
    if stale:  # forgotten, so the task imports them again from the caller's path
        for name in list(sys.modules):
            if name in modules or name.startswith("zemosaic"):
                sys.modules.pop(name)


def _start_worker(caller_pid: int, sys_path: list, modules: dict) -> None:
    """Pool worker initializer: the caller's modules (:func:`_use_callers_modules`), and an end
    when the caller is gone (:func:`_exit_with_caller`)."""
    _use_callers_modules(sys_path, modules)
    _exit_with_caller(caller_pid)


def _exit_with_caller(caller_pid: int, period_s: float = 0.5) -> None:
    """End this worker when the caller is gone.

    A pool's workers wait on a queue whose write end they hold themselves, so a caller that is
    killed (a crash, SIGKILL) would leave them running for ever, holding its terminal's pipes.
    """
    def watch():
        while _is_alive(caller_pid):
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, name="zemosaic-caller-watch", daemon=True).start()


class PoolExecutor(_FutureExecutor):
    """A local pool of ``workers`` processes (forkserver: workers start without the caller's
    threads and GUI, and without re-importing the pipeline for every pool)."""

    name = "process pool"
    lost_errors = (BrokenProcessPool,)

    def __init__(self, workers: int, preload=_POOL_PRELOAD):
        self.workers = self.memory_share = workers
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(list(preload))
        modules = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
                   if name.startswith("zemosaic")}
        self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                            initializer=_start_worker,
                                            initargs=(os.getpid(), list(sys.path), modules))

    def _submit(self, call, *args):
        try:
            return self._pool.submit(call, *args)
        except (cf.process.BrokenProcessPool, OSError, EOFError) as exc:
            # A worker could not even start: the pool broke while earlier ones started (the
            # forkserver dies when importing the calling script runs a pipeline), a race with
            # the same cause as a pool that breaks under a running task.
            raise WorkersLost(_reason(exc)) from exc

    def _as_completed(self, futures, timeout):
        done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return done

    def _wait_quietly(self, futures):
        cf.wait(futures)

    def close(self):
        """Stop the worker processes."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(_FutureExecutor):
    """Tasks on a ``dask.distributed`` cluster: the scheduler at ``address``, or a ``LocalCluster``
    of ``workers`` single-threaded processes when ``address`` is ``local``.

    Workers read the frames and write the tiles through the paths in the task: on several
    machines, the input and output folders must be shared under the same paths.
    """

    name = "dask"

    def __init__(self, address: str, workers: int):
        from distributed import Client, KilledWorker, LocalCluster

        self.lost_errors = (KilledWorker,)
        self._cluster = None
        if address == LOCAL_CLUSTER:
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            self._client = Client(self._cluster)
        else:
            self._client = Client(address, timeout="30s")
        info = self._client.scheduler_info()["workers"].values()
        self.workers = max(1, sum(w.get("nthreads", 1) for w in info))
        # Tasks on one host share its memory: the largest number that may run on one host at once.
        per_host: dict[str, int] = {}
        for w in info:
            host = w.get("host") or w.get("id", "")
            per_host[host] = per_host.get(host, 0) + w.get("nthreads", 1)
        self.memory_share = max(per_host.values(), default=1)
        self.name = f"dask ({self._client.scheduler.address}, {self.workers} thread(s))"

    def _submit(self, call, *args):
        return self._client.submit(call, *args, pure=False)

    def _cancel_pending(self, futures):
        """Nothing is cancelled: a Dask future cancelled while it runs keeps running with its
        result thrown away (a tile written after the run, missing from the manifest). Queued
        tasks see the cancel flag as they start and end at once."""

    def _as_completed(self, futures, timeout):
        from distributed import wait

        try:
            done, _ = wait(list(futures), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        return [f for f in done if f in futures]

    def _wait_quietly(self, futures):
        from distributed import wait

        if futures:
            try:
                wait(list(futures))
            except cf.CancelledError:  # what waiting on the futures just cancelled reports
                pass

    def close(self):
        """Disconnect; a ``LocalCluster`` started here is shut down."""
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def _reason(exc: BaseException) -> str:
    """Return a one-line reason for a failed task."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def warm_up(dask_scheduler: str, num_processing_workers: int, n_tasks: int) -> None:
    """Start, in the background, the server that the local pool for ``n_tasks`` tile tasks forks from.

    It imports the pipeline once (the slow part of starting a worker); started as soon as the
    tiles are known, that happens while the run checks which tiles it can reuse, and the pool's
    workers then start at once. Nothing happens when :func:`make_executor` would run the tiles in this
    process (one tile, one worker) or on Dask, or without ``forkserver``: an idle server would
    only take a core from the tile being built.
    """
    if dask_scheduler or min(resolve_workers(num_processing_workers), n_tasks) <= 1 \
            or "forkserver" not in multiprocessing.get_all_start_methods():
        return
    import multiprocessing.forkserver as forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(_POOL_PRELOAD))
    threading.Thread(target=forkserver.ensure_running, name="zemosaic-forkserver", daemon=True).start()


def make_executor(dask_scheduler: str, num_processing_workers: int, n_tasks: int):
    """Return the executor for ``n_tasks`` tile tasks (see the module doc); call ``close()`` after."""
    if dask_scheduler:
        return DaskExecutor(dask_scheduler, resolve_workers(num_processing_workers))
    workers = min(resolve_workers(num_processing_workers), n_tasks)
    if workers <= 1:
        return InProcessExecutor()
    return PoolExecutor(workers)
