"""The command line, and what the desktop window shares with it.

``python -m zemosaic_worker CONFIG.json [--log-level LEVEL]`` (or the ``zemosaic-worker`` command)
lands in :func:`main`: it reads the configuration, shows one tqdm bar per phase on a terminal
with the log records above them, every line within 80 columns there (:func:`fit_columns`), writes the
run's log to ``zemosaic_run.log`` in the output folder, prints the end-of-run summary and turns
failures into one line and an exit code (1 a run that cannot be made, 2 a bad
configuration, 130 Ctrl-C or cancel, 143 SIGTERM). Any other exception is a bug: exit 1, its type
and message on the terminal, its traceback in the run log. The window uses the same run log and summary
(:func:`attach_run_log`, :func:`detach_run_log`, :func:`format_summary`, :func:`wcs_summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
import traceback

from zemosaic_config import CHOICES, ConfigError, MosaicConfig, load_config
from zemosaic_version import __version__

# The pipeline (zemosaic_worker: NumPy, astropy, a second or two to import) is imported in main,
# where Ctrl-C during its imports ends the program like Ctrl-C during the run.

logger = logging.getLogger(__name__)


# What each phase counts, shown as the unit of its progress bar.
PHASE_UNITS = {"scan": "frames", "solve": "frames", "group": "steps", "master_tiles": "tiles",
               "grid": "steps", "assembly": "steps", "write": "steps"}


def estimate_eta(elapsed_s: float, done: int, total: int) -> float | None:
    """Return the seconds left in a phase from its elapsed time and progress, None if unknown."""
    if total <= 0 or done <= 0 or done >= total:
        return None
    return elapsed_s * (total - done) / done


def format_eta(seconds: float | None) -> str:
    """Return ``"ETA 1 min 05 s"``-style text, or an empty string when unknown."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds >= 60:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds} s"


class _TerminalProgress:
    """Turns progress callbacks into tqdm bars on a terminal: one per phase, 80 columns at most.

    The master-tile phase also reports each aligned frame of the tile in progress (same phase,
    the frames of one tile as total); those updates go into the bar's text so the bar counts tiles.
    The time left is :func:`estimate_eta`'s, as in the window.
    """

    def __init__(self, stream=sys.stderr, width=80):
        self.stream, self.width = stream, width
        self.enabled = stream.isatty()
        self._phase, self._bar, self._t0 = None, None, 0.0

    def _eta(self) -> str:
        return format_eta(estimate_eta(time.monotonic() - self._t0, self._bar.n, self._bar.total))

    def __call__(self, phase, done, total, message=""):
        if not self.enabled:
            return
        from tqdm import tqdm  # only a terminal run draws bars

        if phase != self._phase:
            self.close()
            self._phase, self._t0 = phase, time.monotonic()
            self._bar = tqdm(total=total, desc=f"{phase:<12}", unit=PHASE_UNITS.get(phase, "steps"),
                             file=self.stream, ncols=min(self.width, shutil.get_terminal_size().columns),
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} {unit} {elapsed}{postfix}",
                             leave=True)
        if phase == "master_tiles" and ": aligned " in message:
            tile = message.split(": aligned ")[0]
            self._bar.set_postfix_str(f"{self._eta()} {tile} {done}/{total}".strip(), refresh=True)
            return
        self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(f"{self._eta()} {message[:20]}".strip(), refresh=True)

    def close(self):
        """Finish the current bar (it stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: What the command line prints on a terminal fits this many columns (piped or in the run log,
#: each record stays on one line).
TERMINAL_COLUMNS = 80


def fit_columns(text: str, width: int = TERMINAL_COLUMNS) -> str:
    """Return ``text`` with each line longer than ``width`` wrapped at spaces (a longer word, a
    path, is cut), the continuation lines indented 4 spaces past the line's own indent."""
    lines = []
    for line in text.splitlines() or [""]:
        if len(line) <= width:
            lines.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        lines += textwrap.wrap(line, width, subsequent_indent=indent + "    ", break_on_hyphens=False)
    return "\n".join(lines)


def _columns(stream) -> int | None:
    """Return the columns a line to ``stream`` may take: at most :data:`TERMINAL_COLUMNS` on a
    terminal, None (one line per record, for grep and files) elsewhere."""
    if not stream.isatty():
        return None
    return min(TERMINAL_COLUMNS, shutil.get_terminal_size().columns)


class _ColumnsFormatter(logging.Formatter):
    """The terminal's log format, on a terminal every line within :data:`TERMINAL_COLUMNS`."""

    def __init__(self, fmt, stream):
        super().__init__(fmt)
        self.width = _columns(stream)

    def format(self, record):
        text = super().format(record)
        return text if self.width is None else fit_columns(text, self.width)


def _print_to_terminal(text: str, stream=None) -> None:
    """Print ``text`` to ``stream`` (standard error by default), on a terminal within
    :data:`TERMINAL_COLUMNS`."""
    stream = stream or sys.stderr
    width = _columns(stream)
    print(text if width is None else fit_columns(text, width), file=stream, flush=True)


def pipeline_logger_names() -> tuple[str, ...]:
    """Return the names of the project's loggers: one per ``zemosaic_*`` module, each logging
    under its module name (docs/architecture.md), so a new module is included by being there."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return tuple(sorted(name[:-3] for name in os.listdir(folder)
                        if name.startswith("zemosaic_") and name.endswith(".py")))


def attach_run_log(config: MosaicConfig) -> logging.Handler | None:
    """Start ``zemosaic_run.log`` in the output folder: a FileHandler on the root logger.

    For the front ends (CLI, window), which call :func:`detach_run_log` when the run ends; the
    pipeline itself adds no handler. The file records the run at the configured level. None
    when the folder cannot hold it (the run then reports the unwritable folder itself).
    """
    from zemosaic_worker import LOG_NAME

    try:
        os.makedirs(config.output_folder, exist_ok=True)
        handler = logging.FileHandler(os.path.join(config.output_folder, LOG_NAME), mode="w",
                                      encoding="utf-8")
    except OSError:
        return None
    handler.setLevel(config.logging_level)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    """Stop and close a handler made by :func:`attach_run_log` (None is ignored)."""
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def wcs_summary(report) -> str:
    """Return how the used frames got their WCS, e.g. ``"4 from headers, 1 solved, 1 matched"``."""
    sources = [e["wcs"] for e in report.used_frame_wcs()]
    counts = [(sum(s == "header" for s in sources), "from headers"),
              (sum(s == "solved" for s in sources), "solved"),
              (sum(s.startswith("matched") for s in sources), "matched"),
              (sum(s == "cache" for s in sources), "from the cache")]
    return ", ".join(f"{n} {what}" for n, what in counts if n) or "none"


def format_summary(result, brief: bool = False) -> str:
    """Return the end-of-run summary: frames used and skipped, WCS sources, tiles, size, time.

    The full form (terminal, run log) lists every skipped frame with its reason, the outputs and
    the phase timings; the ``brief`` one (the window) the first five skipped frames.
    """
    rep = result.report
    channels, height, width = rep.mosaic_shape or (0, 0, 0)
    skipped = [f"{os.path.basename(s['path'])}: {s['reason']}" for s in rep.frames_skipped]
    facts = [("frames used", len(rep.frames_used)), ("frames skipped", len(skipped)),
             ("frame WCS", wcs_summary(rep)), ("master tiles", len(rep.tiles)),
             ("size", f"{width} x {height} px, {channels} channel(s), "
                      f"assembly on {rep.backends.get('assembly', 'cpu')}")]
    if brief:
        return "\n".join([f"Done in {result.elapsed_s:.1f} s", *(f"{k}: {v}" for k, v in facts),
                          *(f"skipped {s}" for s in skipped[:5])])
    lines = [f"ZeMosaic {rep.version}: mosaic done in {result.elapsed_s:.1f} s"]
    for key, value in facts:
        lines.append(f"  {key + ':':<15} {value}")
        if key == "frames skipped":
            lines += [f"    - {s}" for s in skipped]
    lines += [f"  {key + ':':<15} {path}" for key, path in result.paths.items()]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in rep.timings_s.items() if k != "total")
    lines.append(f"  timings:        {phases}")
    return "\n".join(lines)


#: What Ctrl-C (exit 130) and SIGTERM (exit 143) leave on the terminal, from the imports on.
INTERRUPTED = "\nzemosaic: interrupted; no mosaic written"
TERMINATED = "\nzemosaic: terminated (SIGTERM); no mosaic written"


class _Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds the run like Ctrl-C (temporary files removed, lock released)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


HELP_EPILOG = """main configuration keys (JSON file; all optional except the folders):
  input_folder, output_folder     folders of the raw frames and of the outputs
  stacking_rejection_algorithm    winsorized_sigma_clip | kappa_sigma | none
  stacking_kappa_low, stacking_kappa_high, stacking_winsor_limits
  stacking_final_combine_method   mean | median
  cluster_panel_threshold, max_raw_per_master_tile
  use_gpu_phase5, two_pass_coverage_renorm
  save_channel_files, save_final_as_uint16, logging_level
  num_processing_workers          tiles at once (0: one per core, 1: no workers)
  dask_scheduler                  "" | local | tcp://host:8786 (tiles on Dask)
  (every key, its default and allowed values: README.md, "Configuration keys")

example:
  echo '{"input_folder": "/data/M42", "output_folder": "/data/M42/out"}' >m.json
  python -m zemosaic_worker m.json --log-level DEBUG

outputs (in output_folder): zemosaic_mosaic.fits, zemosaic_mosaic_coverage.fits,
  zemosaic_mosaic_preview.png, zemosaic_mosaic_display.tif, zemosaic_run.json,
  zemosaic_run.log
"""


def _parser() -> argparse.ArgumentParser:
    """Return the command line's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m zemosaic_worker", epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build an RGB mosaic FITS from raw smart-telescope frames\n"
                    "(plate-solved here when they carry no WCS).")
    parser.add_argument("config", help="JSON configuration file (input_folder, output_folder, ...)")
    parser.add_argument("--log-level", choices=CHOICES["logging_level"], type=str.upper,
                        help="log level (default: logging_level from the configuration)")
    parser.add_argument("--plan", action="store_true",
                        help="print what the run would do and take (panels, tiles, frames to solve, "
                             "time, memory, disk) from the frames' headers, and exit")
    parser.add_argument("--watch", action="store_true",
                        help="live mode: keep watching input_folder and make the mosaic again after "
                             "each batch of new frames (watch_batch_frames, watch_batch_seconds); "
                             "Ctrl-C ends it, keeping the last mosaic")
    parser.add_argument("--version", action="version", version=f"ZeMosaic {__version__}")
    return parser


def main(argv=None) -> int:
    """Command line: ``python -m zemosaic_worker CONFIG.json [--log-level LEVEL]``; returns the exit code."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    terminal = logging.StreamHandler()
    terminal.setFormatter(_ColumnsFormatter(TERMINAL_FORMAT, terminal.stream))
    logging.basicConfig(level=args.log_level or "INFO", handlers=[terminal])
    zw, held = _import_pipeline()
    if held == signal.SIGTERM:
        _print_to_terminal(TERMINATED)
        return 143
    if held is not None:
        _print_to_terminal(INTERRUPTED)
        return 130
    return _run(args, zw)


def _import_pipeline():
    """Return ``(zemosaic_worker, signal held)``: the pipeline imported with Ctrl-C and SIGTERM
    held back, the first one that came during the imports, or None.

    Raised inside a library's compiled import, a KeyboardInterrupt can come out as an
    ImportError (NumPy's ``PyCapsule_Import could not import module "datetime"``), so the
    signal is only noted during the imports and acted on after them.
    """
    if threading.current_thread() is not threading.main_thread():  # no signals there
        import zemosaic_worker
        return zemosaic_worker, None
    held: list = []
    saved = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        import zemosaic_worker
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return zemosaic_worker, (held[0] if held else None)


def _run(args, zw) -> int:
    """Run the configuration of ``args`` with the pipeline module ``zw``; returns the exit code."""
    debug = args.log_level == "DEBUG"
    progress, run_log = _TerminalProgress(), None
    try:
        with _kept_records("zemosaic_config") as config_records:
            config = load_config(args.config)
        level = args.log_level or config.logging_level
        logging.getLogger().setLevel(level)
        debug = level == "DEBUG"
        if args.plan:
            return _print_plan(config)
        run_log = attach_run_log(config.replace(logging_level=level))
        for record in config_records:  # what loading the file said (unknown keys) goes in the run log too
            if run_log is not None and record.levelno >= run_log.level:
                run_log.handle(record)
        with _logs_above_the_bars(progress):
            if args.watch:
                return _watch(config, progress)
            result = zw.run_mosaic(config, progress=progress)
    except (ConfigError, zw.PipelineError) as exc:
        progress.close()
        _report_failure(exc, debug)
        return 2 if isinstance(exc, ConfigError) else 1
    except zw.Cancelled:
        progress.close()
        _print_to_terminal("zemosaic: cancelled")
        return 130
    except _Terminated:
        progress.close()
        _print_to_terminal(TERMINATED)
        return 143
    except KeyboardInterrupt:
        progress.close()
        _print_to_terminal(INTERRUPTED)
        return 130
    except Exception as exc:  # a bug (the error policy): the run stops, its traceback is kept
        progress.close()
        if not debug:
            _log_traceback(exc, run_log)
        _report_failure(exc, debug, unexpected=True)
        return 1
    finally:
        detach_run_log(run_log)
    progress.close()
    try:
        _print_to_terminal(format_summary(result), sys.stdout)
    except BrokenPipeError:  # `| head` closed the pipe: the run itself succeeded
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
    return 0


def _watch(config, progress) -> int:
    """``--watch``: live mode until Ctrl-C (exit 130, one line; the last mosaic stays)."""
    import zemosaic_watch

    made = []

    def show(result):
        progress.close()
        made.append(result)
        _print_to_terminal(format_summary(result), sys.stdout)

    try:
        zemosaic_watch.watch(config, progress=progress, on_batch=show)
    except _Terminated:  # SIGTERM: exit 143 as for any run
        raise
    except KeyboardInterrupt:
        progress.close()
        _print_to_terminal(f"\nzemosaic: live mode stopped after {len(made)} mosaic(s)"
                           + ("; the last one stays in the output folder" if made else ""))
        return 130
    return 0


def _print_plan(config) -> int:
    """``--plan``: print :func:`zemosaic_plan.format_plan` of the configuration; nothing is written."""
    import zemosaic_plan

    _print_to_terminal(zemosaic_plan.format_plan(zemosaic_plan.plan_run(config)), sys.stdout)
    return 0


@contextlib.contextmanager
def _logs_above_the_bars(progress):
    """Within the block, log records on the terminal are written above the progress bars
    (tqdm's logging redirect) instead of into the middle of a bar's line."""
    if not progress.enabled:  # no bars (not a terminal): nothing to keep clear of
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


@contextlib.contextmanager
def _kept_records(name: str):
    """Yield a list that collects the records logger ``name`` emits inside the block (they are
    shown as usual too): the configuration is read before the run log it belongs in exists."""
    records: list = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    source = logging.getLogger(name)
    source.addHandler(handler)
    try:
        yield records
    finally:
        source.removeHandler(handler)


def _log_traceback(exc, run_log) -> None:
    """Write ``exc`` with its traceback into the run log only (the terminal keeps one line), or
    onto the terminal when there is no run log to hold it."""
    if run_log is None:
        traceback.print_exception(exc, file=sys.stderr)
        return
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "run failed (a bug)", (),
                               (type(exc), exc, exc.__traceback__))
    run_log.handle(record)


def _report_failure(exc, debug, unexpected=False):
    """Print a one-line failure reason; the traceback only at DEBUG."""
    if debug:
        logger.exception("run failed")
    kind = f"{type(exc).__name__}: " if unexpected else ""
    _print_to_terminal(f"zemosaic: error: {kind}{exc}")


