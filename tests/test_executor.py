"""Tile tasks on every executor: in-process, a local process pool, a Dask cluster — same mosaic."""

import logging
import os
import threading
import time

import numpy as np
import pytest

import zemosaic_cli as zcli
import zemosaic_executor as zexec
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import ConfigError, config_from_dict
from zemosaic_fits import read_image_fits


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Two panels of three small frames: two master tiles to build in parallel."""
    root = tmp_path_factory.mktemp("executor")
    info = zemosaic_synth.generate_dataset(root, panels=(1, 2), frames_per_panel=3, seed=11,
                                           size="small")
    return info["frames_dir"]


def _run(frames_dir, out, **settings):
    config = config_from_dict({"input_folder": str(frames_dir), "output_folder": str(out),
                               **settings})
    result = zw.run_mosaic(config)
    image, _, coverage, _ = read_image_fits(out / zw.MOSAIC_NAME)
    return result, image, coverage


@pytest.fixture(scope="module")
def in_process(frames, tmp_path_factory):
    return _run(frames, tmp_path_factory.mktemp("one") / "out", num_processing_workers=1)


def _assert_same_mosaic(run, reference):
    result, image, coverage = run
    np.testing.assert_array_equal(image, reference[1])
    np.testing.assert_array_equal(coverage, reference[2])
    assert result.report.frames_used == reference[0].report.frames_used
    assert [t["frames"] for t in result.report.tiles] == [3, 3]


def test_in_process_is_the_default_for_one_worker(in_process):
    assert in_process[0].report.backends["tile_executor"] == "in-process"
    assert np.isfinite(in_process[1]).any()


def test_process_pool_gives_the_same_mosaic_bit_for_bit(frames, in_process, tmp_path):
    run = _run(frames, tmp_path / "out", num_processing_workers=2)
    assert run[0].report.backends["tile_executor"] == "process pool"
    _assert_same_mosaic(run, in_process)


def test_spare_workers_align_frames_in_threads_to_the_same_mosaic(frames, in_process, tmp_path):
    # Four workers, two tiles: a pool of two, each aligning its frames two at a time.
    run = _run(frames, tmp_path / "out", num_processing_workers=4)
    _assert_same_mosaic(run, in_process)


def test_dask_local_cluster_gives_the_same_mosaic_bit_for_bit(frames, in_process, tmp_path):
    pytest.importorskip("distributed")
    run = _run(frames, tmp_path / "out", dask_scheduler="local", num_processing_workers=2)
    assert run[0].report.backends["tile_executor"].startswith("dask (tcp://")
    _assert_same_mosaic(run, in_process)


def test_a_tile_task_error_skips_its_frames_with_the_reason(frames, tmp_path, monkeypatch):
    real = zw.build_master_tile

    def refused(task, ctx):
        if task.index == 1:
            raise zexec.TaskError("no room for the stack")
        return real(task, ctx)

    monkeypatch.setattr(zw, "build_master_tile", refused)
    result, image, _ = _run(frames, tmp_path / "out", num_processing_workers=1)
    assert [t["index"] for t in result.report.tiles] == [0]
    reasons = {s["reason"] for s in result.report.frames_skipped}
    assert reasons == {"tile 001 failed: TaskError: no room for the stack"}
    assert len(result.report.frames_skipped) == 3 and len(result.report.frames_used) == 3
    assert np.isfinite(image).any()


def test_a_bug_in_stacking_stops_the_run_with_its_traceback_in_the_run_log(frames, tmp_path,
                                                                          monkeypatch, capsys):
    """The error policy: a bug is not a skipped tile. The run ends with exit 1, no mosaic, the
    traceback in ``zemosaic_run.log`` and one line on the terminal."""
    import json

    import zemosaic_master_tile as zmt

    def buggy(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'float' and 'NoneType'")

    monkeypatch.setattr(zmt, "_stack_group", buggy)
    out = tmp_path / "out"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": str(frames), "output_folder": str(out),
                               "num_processing_workers": 1}))
    assert zcli.main([str(cfg)]) == 1
    assert not (out / zw.MOSAIC_NAME).exists()
    log = (out / zw.LOG_NAME).read_text()
    assert "Traceback (most recent call last)" in log and "in buggy" in log
    assert "TypeError: unsupported operand" in log
    err = capsys.readouterr().err
    assert "TypeError" in err and "Traceback" not in err


def test_stacks_share_the_ram_budget_between_parallel_tiles(tmp_path, monkeypatch):
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 3 * 4 * 1000)
    in_ram = zexec.allocate_stack((10, 10, 10, 3), str(tmp_path), ram_share=1)
    on_disk = zexec.allocate_stack((10, 10, 10, 3), str(tmp_path), ram_share=2)
    assert isinstance(in_ram, np.ndarray) and isinstance(on_disk, zexec.DiskStack)
    zexec.release_stack(on_disk[:, 2:5])  # a view releases the file too
    assert not list(tmp_path.iterdir())


def _disk_with_free_bytes(monkeypatch, free):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


def test_a_stack_the_disk_cannot_hold_is_refused_before_any_frame_is_aligned(tmp_path, monkeypatch):
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 0)
    _disk_with_free_bytes(monkeypatch, 2**30)
    stack = zexec.allocate_stack((10, 100, 100, 3), str(tmp_path))  # 1.2 MB: fits
    zexec.release_stack(stack)
    with pytest.raises(zexec.NoDiskSpace, match=r"needs 2\.2 GB of disk cache .* 1\.0 GB free"):
        zexec.allocate_stack((50, 1960, 2000, 3), str(tmp_path))
    assert not list(tmp_path.iterdir())  # no file made


def test_a_disk_that_fills_while_frames_are_written_says_so(tmp_path):
    import errno

    stack = zexec.DiskStack.create(str(tmp_path), (2, 4, 5, 3))

    class FullDisk:
        def seek(self, offset):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real, stack._store.handle = stack._store.handle, FullDisk()
    with pytest.raises(zexec.NoDiskSpace, match="max_raw_per_master_tile"):
        stack[1] = np.ones((4, 5, 3), np.float32)
    stack._store.handle = real
    zexec.release_stack(stack)
    assert not list(tmp_path.iterdir())


def test_a_run_whose_tile_cannot_fit_on_disk_stops_with_that_reason(frames, tmp_path, monkeypatch):
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 0)
    _disk_with_free_bytes(monkeypatch, 1000)
    with pytest.raises(zw.PipelineError, match="of disk cache in .*: free some space"):
        _run(frames, tmp_path / "out", num_processing_workers=1)
    assert not (tmp_path / "out" / zw.MOSAIC_NAME).exists()


def test_disk_stack_reads_back_what_was_written_through_any_view(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(5, 7, 9, 3)).astype(np.float32)
    stack = zexec.DiskStack.create(str(tmp_path), truth.shape)
    for i in range(5):
        stack[i] = truth[i]
    assert np.array_equal(np.asarray(stack), truth) and np.array_equal(stack[-1], truth[-1])
    crop = stack[:, 1:6, 2:8]  # the canvas of the frames actually used
    assert crop.shape == (5, 5, 6, 3)
    assert np.array_equal(crop[1], truth[1, 1:6, 2:8])
    assert np.array_equal(np.ascontiguousarray(crop[:3][:, 2:4], dtype=np.float32), truth[:3, 3:5, 2:8])
    crop[4] = np.zeros((5, 6, 3), np.float32)
    truth[4, 1:6, 2:8] = 0.0
    assert np.array_equal(np.asarray(stack), truth)
    with pytest.raises(IndexError):
        stack[:, ::2]
    with pytest.raises(ValueError):
        stack[0] = np.zeros((7, 9, 1), np.float32)
    stack.close()
    assert not list(tmp_path.iterdir())


def test_a_float16_disk_stack_keeps_its_own_bytes_and_reads_back_as_any_view(tmp_path):
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 4, (4, 6, 8, 3)).astype(np.float16)
    truth[1, 2, 3] = np.nan
    stack = zexec.DiskStack.create(str(tmp_path), truth.shape, np.float16)
    for i in range(4):
        stack[i] = truth[i].astype(np.float32)  # converted as it is written
    assert stack.dtype == np.float16 and os.path.getsize(stack._store.path) == truth.nbytes
    assert np.array_equal(np.asarray(stack), truth, equal_nan=True)
    crop = stack[:, 1:5, 2:7]
    np.testing.assert_array_equal(np.ascontiguousarray(crop[1:3][:, 1:3], np.float32),
                                  truth[1:3, 2:4, 2:7].astype(np.float32))
    crop[3] = np.zeros((4, 5, 3))
    truth[3, 1:5, 2:7] = 0
    assert np.array_equal(np.asarray(stack), truth, equal_nan=True)
    zexec.release_stack(stack)
    assert not list(tmp_path.iterdir())


def test_a_tile_s_stacks_go_to_ram_or_to_disk_together(tmp_path, monkeypatch):
    # Frames (float32) and their pixel weights (float16): 12 000 + 6 000 bytes.
    layouts = [((10, 10, 10, 3), np.float32), ((10, 10, 10, 3), np.float16)]
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 18_000)
    in_ram = zexec.allocate_stacks(layouts, str(tmp_path))
    assert [type(s) for s in in_ram] == [np.ndarray, np.ndarray] and in_ram[1].dtype == np.float16
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 17_999)  # the frames alone would fit
    on_disk = zexec.allocate_stacks(layouts, str(tmp_path))
    assert [type(s) for s in on_disk] == [zexec.DiskStack, zexec.DiskStack]
    assert [s.dtype for s in on_disk] == [np.float32, np.float16]
    for stack in on_disk:
        zexec.release_stack(stack)
    assert not list(tmp_path.iterdir())


# Toy tasks for the executors themselves (module level: worker processes import them by name).

def square_or_fail(task, ctx):
    if task == 3:
        raise zexec.TaskError("three is not welcome\nsecond line")
    return task * task


def square_or_bug(task, ctx):
    if task == 3:
        raise TypeError("a bug in task three")
    time.sleep(0.2)
    return task * task


def slow_until_cancelled(task, ctx):
    for _ in range(400):
        ctx.check_cancel()
        time.sleep(0.05)
    return task


class _Ctx:
    def __init__(self, event=None):
        self.event = event

    def report(self, *args):
        pass

    def check_cancel(self):
        if self.event is not None and self.event.is_set():
            raise zexec.Cancelled("cancelled by user")


def test_pool_returns_results_and_errors_per_task(tmp_path):
    pool = zexec.PoolExecutor(2)
    try:
        flag = zexec.CancelFlag(str(tmp_path / ".cancel"))
        outcomes = sorted(pool.run(square_or_fail, [1, 2, 3, 4], _Ctx(), flag), key=lambda o: o.index)
    finally:
        pool.close()
    assert [o.result for o in outcomes] == [1, 4, None, 16]
    assert outcomes[2].error == "TaskError: three is not welcome"


def _two_workers(kind: str):
    """Return an executor of two workers: a local process pool, or a Dask LocalCluster."""
    if kind == "dask":
        pytest.importorskip("distributed")
        return zexec.DaskExecutor(zexec.LOCAL_CLUSTER, 2)
    return zexec.PoolExecutor(2)


@pytest.mark.parametrize("kind", ["pool", "dask"])
def test_a_bug_in_a_worker_task_propagates_with_its_type(kind, tmp_path):
    pool = _two_workers(kind)
    try:
        flag = zexec.CancelFlag(str(tmp_path / ".cancel"))
        with pytest.raises(TypeError, match="a bug in task three"):
            list(pool.run(square_or_bug, [1, 2, 3, 4, 5, 6], _Ctx(), flag))
    finally:
        pool.close()


def test_a_worker_that_cannot_start_means_workers_lost(tmp_path, monkeypatch):
    """The pool can break while it is still starting workers (the forkserver dies when importing
    the calling script runs a pipeline): the error comes from submitting a task, not from a
    result, and must read as lost workers too, not escape as an OSError."""
    pool = zexec.PoolExecutor(2)
    started = []

    def submit_then_break(call, *args):
        if started:
            raise OSError(9, "Bad file descriptor")
        started.append(call)
        return original(call, *args)

    original = pool._pool.submit
    monkeypatch.setattr(pool._pool, "submit", submit_then_break)
    try:
        flag = zexec.CancelFlag(str(tmp_path / ".cancel"))
        with pytest.raises(zexec.WorkersLost, match="Bad file descriptor"):
            list(pool.run(square_or_fail, [1, 2], _Ctx(), flag))
    finally:
        pool.close()


def test_warm_up_starts_the_pool_server_only_for_a_local_pool_of_several_tiles(monkeypatch):
    import multiprocessing.forkserver as forkserver

    started = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(threading.current_thread().name))

    def warm(*args):
        zexec.warm_up(*args)
        for thread in threading.enumerate():
            if thread.name == "zemosaic-forkserver":
                thread.join(10)

    warm("", 1, 5)
    warm("local", 4, 5)
    warm("", 2, 1)  # one tile runs in this process: a server would only idle
    assert started == []
    warm("", 2, 2)
    assert started == ["zemosaic-forkserver"]


def test_cancel_stops_running_pool_tasks_between_frames(tmp_path):
    cancel = threading.Event()
    pool = zexec.PoolExecutor(2)
    flag = zexec.CancelFlag(str(tmp_path / ".cancel"))
    threading.Timer(0.5, cancel.set).start()
    try:
        with pytest.raises(zexec.Cancelled):
            list(pool.run(slow_until_cancelled, [1, 2, 3], _Ctx(cancel), flag))
    finally:
        pool.close()
    assert not flag.is_set()  # lowered again for the next run


@pytest.mark.parametrize("key, value", [("num_processing_workers", -2),
                                        ("num_processing_workers", 2.5),
                                        ("dask_scheduler", "my cluster"),
                                        ("dask_scheduler", 8786)])
def test_bad_executor_settings_name_the_key_and_what_is_allowed(key, value):
    with pytest.raises(ConfigError) as err:
        config_from_dict({key: value})
    assert err.value.key == key and key in str(err.value) and "expected" in str(err.value)


def test_worker_count_zero_means_every_core():
    assert zexec.resolve_workers(0) >= 1 and zexec.resolve_workers(3) == 3
    assert config_from_dict({"dask_scheduler": " tcp://10.0.0.5:8786 "}).dask_scheduler == \
        "tcp://10.0.0.5:8786"


def finishing_or_stopping(task, ctx):
    """Task "finish" ignores the cancel for 1.5 s (a tile writing its file), then returns; the
    others check it every 50 ms for up to 20 s; each leaves a file saying it started."""
    name, folder = task
    open(os.path.join(folder, name), "w").close()
    if name == "finish":
        time.sleep(1.5)
        return name
    return slow_until_cancelled(name, ctx)


@pytest.mark.parametrize("kind", ["pool", "dask"])
def test_cancel_stops_running_tasks_in_seconds_and_hands_over_those_that_finished(kind, tmp_path):
    pool = _two_workers(kind)
    cancel = threading.Event()
    flag = zexec.CancelFlag(str(tmp_path / ".cancel"))
    started = tmp_path / "started"
    started.mkdir()
    tasks = [(name, str(started)) for name in ("finish", "stop", "queued-1", "queued-2")]
    outcomes, cancelled_at = [], []

    def cancel_once_both_run():
        deadline = time.monotonic() + 60
        while len(os.listdir(started)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        cancelled_at.append(time.monotonic())
        cancel.set()

    threading.Thread(target=cancel_once_both_run, daemon=True).start()
    try:
        with pytest.raises(zexec.Cancelled):
            for outcome in pool.run(finishing_or_stopping, tasks, _Ctx(cancel), flag):
                outcomes.append(outcome)
        stop_s = time.monotonic() - cancelled_at[0]
    finally:
        pool.close()
    assert [(o.index, o.result) for o in outcomes] == [(0, "finish")]  # it finished during the cancel
    assert not flag.is_set()
    assert stop_s < 3.0, stop_s  # "finish" ends 1.2 s after the cancel; "stop" would run 20 s
    # The queued tasks did no work: dropped (pool) or ended as they started (Dask).
    assert sorted(os.listdir(started)) == ["finish", "stop"]


def test_cancel_during_parallel_tiles_writes_no_mosaic_and_leaves_no_scratch(frames, tmp_path):
    cancel = threading.Event()
    handler = logging.Handler()
    # Cancel once the tiles are handed to the pool: the workers are stopped between frames.
    handler.emit = lambda record: "on process pool" in record.getMessage() and cancel.set()
    out = tmp_path / "out"
    config = config_from_dict({"input_folder": str(frames), "output_folder": str(out),
                               "num_processing_workers": 2})
    logger = logging.getLogger("zemosaic_worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(zw.Cancelled):
            zw.run_mosaic(config, cancel=cancel)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert cancel.is_set()
    assert not list((out / zw.TILES_DIR).glob("master_tile_*.fits"))  # stopped before stacking
    assert not (out / zw.MOSAIC_NAME).exists() and not (out / zw.REPORT_NAME).exists()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".cancel"))
    assert not (out / zw.CACHE_DIR / zw.STACK_CACHE_DIR).exists()


def test_script_without_main_guard_gets_a_clear_error(frames, tmp_path):
    """Pool workers import the calling script: one that calls run_mosaic at its top level breaks
    them. The run stops with one clear error that says what to do, instead of every tile failing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text("import zemosaic_worker as zw\nfrom zemosaic_config import config_from_dict\n"
                      f"zw.run_mosaic(config_from_dict({{'input_folder': {str(frames)!r}, "
                      f"'output_folder': {str(tmp_path / 'out')!r}, 'num_processing_workers': 2}}))\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root)), cwd=tmp_path)
    assert proc.returncode != 0
    assert "PipelineError" in proc.stderr and "if __name__ == \"__main__\":" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / zw.MOSAIC_NAME).exists()
