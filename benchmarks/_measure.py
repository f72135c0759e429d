"""Shared helpers of the peer benchmarks: measuring a child process and printing tables.

Each measured method runs in a fresh child process so its peak resident memory is its own.
The child is started by a small launcher process (this file run as a script) that reaps it with
``os.wait4`` and reports its ``ru_maxrss``: a process started directly by the benchmark would
inherit the benchmark's own high-water mark through fork/exec (Linux carries the old address
space's peak into ``ru_maxrss``), so every row would show at least the parent's peak.
Python workers print one line ``RESULT {json}`` with the wall time of the measured call (setup
such as loading the inputs is not timed); external tools (Siril, SWarp) are timed as whole
processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

RESULT_PREFIX = "RESULT "


@dataclass
class ChildRun:
    """Outcome of one measured child process."""

    returncode: int
    wall_s: float  # whole process, start to exit
    peak_rss_bytes: int  # the child's ru_maxrss
    stdout: str
    stderr: str
    result: dict = field(default_factory=dict)  # the worker's RESULT line, when it printed one

    @property
    def ok(self) -> bool:
        """True when the child exited with status 0."""
        return self.returncode == 0

    def tail(self, lines: int = 15) -> str:
        """Return the last lines of the child's stderr and stdout (for error messages)."""
        text = (self.stderr.strip() + "\n" + self.stdout.strip()).strip()
        return "\n".join(text.splitlines()[-lines:])


def _wait_measured(cmd, cwd=None, env=None, stdout=None, stderr=None):
    """Run ``cmd``; return ``(exit code, wall s, ru_maxrss bytes)`` read with ``os.wait4``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, int(usage.ru_maxrss) * 1024


def _launch(measure_path, cmd) -> int:
    """Launcher side: run ``cmd`` with inherited output, write its measurements as JSON."""
    code, wall, peak = _wait_measured(cmd)
    with open(measure_path, "w") as fh:
        json.dump({"returncode": code, "wall_s": wall, "peak_rss_bytes": peak}, fh)
    return 0


def siril_env(work_dir) -> dict:
    """Return the environment for a Siril run with a configuration of its own under ``work_dir``.

    Siril keeps settings across runs in the user's configuration (``setext`` changes the extension
    of every later run's files): a benchmark must neither depend on nor change them.
    """
    return {**os.environ, "XDG_CONFIG_HOME": os.path.join(str(work_dir), "siril-config")}


class MontageError(RuntimeError):
    """A Montage program failed: its exit status was not 0 or its status line was not OK."""


def _montage_value(text: str):
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_montage_status(text: str) -> dict | None:
    """Return the fields of the last ``[struct stat="...", key=value, ...]`` line of ``text``.

    Montage programs report one such line (on stdout, or in the ``-s`` status file); string
    values are quoted, numbers are not. None when there is no such line.
    """
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[struct") and line.endswith("]"):
            found = line[len("[struct"):-1]
    if found is None:
        return None
    fields, key, value, quoted = {}, None, "", False
    token = ""
    for ch in found + ",":  # split on commas outside quotes, then on the first "="
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            key, _, value = token.partition("=")
            if key.strip():
                fields[key.strip()] = _montage_value(value)
            token = ""
        else:
            token += ch
    return fields


def run_montage(args, cwd=None, timeout: float = 600) -> dict:
    """Run a Montage program (``args[0]``) and return its status fields (``stat`` is ``"OK"``).

    Raises :class:`MontageError` with Montage's own message when the program exits non-zero,
    prints no status line or reports ``stat="ERROR"`` (or anything but OK).
    """
    args = [str(a) for a in args]
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    status = parse_montage_status(proc.stdout)
    if proc.returncode != 0 or status is None or status.get("stat") != "OK":
        detail = (status or {}).get("msg") or (proc.stdout + proc.stderr).strip()[-2000:]
        raise MontageError(f"{' '.join(args)} failed (exit {proc.returncode}): {detail}")
    return status


def run_child(cmd, cwd=None, env=None) -> ChildRun:
    """Run ``cmd`` to completion; return its wall time, its own peak RSS and its output.

    Output goes through temporary files (not pipes) so a chatty child cannot block. The wall time
    is the launcher's measurement of the command alone.
    """
    with tempfile.TemporaryDirectory(prefix="bench_measure_") as tmp, \
            tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        measure_path = os.path.join(tmp, "measure.json")
        launcher = [sys.executable, "-S", os.path.abspath(__file__), "--launch", measure_path, "--", *map(str, cmd)]
        code, _wall, _peak = _wait_measured(launcher, cwd=cwd, env=env, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        if os.path.exists(measure_path):
            with open(measure_path) as fh:
                m = json.load(fh)
            run = ChildRun(m["returncode"], m["wall_s"], m["peak_rss_bytes"], stdout, stderr)
        else:
            run = ChildRun(code or 1, _wall, 0, stdout, stderr + "\n(launcher failed)")
    for line in run.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            run.result = json.loads(line[len(RESULT_PREFIX):])
    return run


def run_python_worker(script: str, args) -> ChildRun:
    """Run ``script`` with this interpreter as a worker child (``--worker ...`` arguments)."""
    return run_child([sys.executable, script, *map(str, args)])


def report_result(**values) -> None:
    """Print the worker's ``RESULT`` line (called once, at the end of a worker)."""
    print(RESULT_PREFIX + json.dumps(values), flush=True)


def rss_now_bytes() -> int | None:
    """Return the current resident set size of this process, or None off Linux."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    """Return the pids of every descendant of ``pid`` (Linux /proc; [] elsewhere)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def rss_tree_bytes() -> int | None:
    """Return the resident set size of this process plus its descendants (worker processes).

    Pages that forked workers share with each other are counted once per process: an upper bound.
    """
    own = rss_now_bytes()
    if own is None:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/statm") as fh:
                own += int(fh.read().split()[1]) * page
        except OSError:
            pass
    return own


def load_warning(threshold: float = 0.5) -> str | None:
    """Return a warning when other processes keep the CPUs busy (1-minute load average), else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load < threshold:
        return None
    return (f"WARNING: load average {load:.2f} on {os.cpu_count()} cores before the run: other processes "
            "compete for the CPUs and timings are noisy (raise --repeat, or rerun on a quiet machine)")


def print_table(headers, rows, title: str | None = None) -> str:
    """Print rows (lists of already formatted cells) as an aligned text table; return the text."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w)
                           for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def fmt(value, spec: str = ".2f", missing: str = "n/a") -> str:
    """Format a number, or return ``missing`` for None/NaN."""
    if value is None:
        return missing
    try:
        if value != value:  # NaN
            return missing
    except TypeError:
        return str(value)
    return format(value, spec)


if __name__ == "__main__":  # launcher: python _measure.py --launch MEASURE.json -- CMD...
    if len(sys.argv) > 4 and sys.argv[1] == "--launch" and sys.argv[3] == "--":
        sys.exit(_launch(sys.argv[2], sys.argv[4:]))
    sys.exit("usage: _measure.py --launch MEASURE.json -- CMD...")


def numpy_as_gpu() -> None:
    """Make this worker process run the GPU code paths with NumPy standing in for CuPy."""
    import numpy
    import zemosaic_utils

    zemosaic_utils.get_xp = lambda use_gpu=False: numpy
