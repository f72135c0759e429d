"""Command line manners: help, version, typo'd keys, progress bars within 80 columns, run log."""

import io
import json
import logging
import os
import re

import pytest

import zemosaic_synth
import zemosaic_cli
import zemosaic_worker as zw
from zemosaic_config import ConfigError, config_from_dict


def test_version_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps what it writes itself to the terminal's width
    with pytest.raises(SystemExit):
        zemosaic_cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"ZeMosaic {zw.__version__}"
    with pytest.raises(SystemExit):
        zemosaic_cli.main(["--help"])
    text = capsys.readouterr().out
    for word in ("input_folder", "stacking_rejection_algorithm", "save_channel_files", "example:",
                 "zemosaic_run.log"):
        assert word in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_typo_key_is_an_error_with_a_suggestion(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'stacking_kappa_low'"):
        config_from_dict({"stacking_kapa_low": 2.0})
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": str(tmp_path), "output_folder": str(tmp_path / "o"),
                               "stacking_kapa_low": 2.0}))
    assert zemosaic_cli.main([str(cfg)]) == 2
    assert "did you mean 'stacking_kappa_low'" in capsys.readouterr().err


def test_far_unknown_key_warns_with_nearest(caplog):
    with caplog.at_level(logging.WARNING):
        config_from_dict({"stacking_kappa_lowest": 2.0, "qt_theme_mode": "x"})
    assert "qt_theme_mode, stacking_kappa_lowest (did you mean stacking_kappa_low?)" in caplog.text


def test_unknown_keys_are_in_the_run_log_and_a_bad_astap_path_stops_before_the_run(tmp_path, capsys):
    info = zemosaic_synth.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=3, seed=5,
                                           size="small")
    out = tmp_path / "out"
    cfg = tmp_path / "c.json"
    settings = {"input_folder": info["frames_dir"], "output_folder": str(out), "qt_theme_mode": "dark"}
    cfg.write_text(json.dumps(settings))
    assert zemosaic_cli.main([str(cfg)]) == 0
    assert "WARNING zemosaic_config: Ignoring unknown configuration keys: qt_theme_mode" in \
        (out / zw.LOG_NAME).read_text()
    written = (out / zw.MOSAIC_NAME).stat().st_mtime_ns
    cfg.write_text(json.dumps({**settings, "astap_executable_path": str(tmp_path / "astap")}))
    assert zemosaic_cli.main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "astap_executable_path: no program at" in err
    assert (out / zw.MOSAIC_NAME).stat().st_mtime_ns == written  # the earlier mosaic is kept


def test_eta_helpers():
    assert zemosaic_cli.estimate_eta(10.0, 1, 3) == pytest.approx(20.0)
    assert zemosaic_cli.estimate_eta(10.0, 0, 3) is None
    assert zemosaic_cli.format_eta(None) == ""
    assert zemosaic_cli.format_eta(65) == "ETA 1 min 05 s"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_one_bar_per_phase_with_unit_within_80_columns():
    stream = _Tty()
    bars = zemosaic_cli._TerminalProgress(stream=stream, width=80)
    for i in range(1, 21):
        bars("scan", i, 20, f"Light_{i:04d}_with_a_long_name.fits")
    for tile in range(1, 4):
        for frame in range(1, 6):
            bars("master_tiles", frame, 5, f"tile {tile:03d}: aligned Light_{frame}.fits")
        bars("master_tiles", tile, 3, f"tile {tile}/3 done")
    bars.close()
    lines = [line for line in re.split(r"[\r\n]", stream.getvalue()) if line.strip()]
    clean = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in lines]
    assert max(len(line) for line in clean) <= 80
    assert any("scan" in line and "20/20 frames" in line for line in clean)
    final_tiles = [line for line in clean if line.startswith("master_tiles")][-1]
    assert "3/3 tiles" in final_tiles  # frames of a tile do not refill the tile bar


def test_run_log_written_at_the_run_level_and_handler_removed(tmp_path):
    info = zemosaic_synth.generate_dataset(tmp_path, panels=(2, 1), frames_per_panel=3, seed=5,
                                           size="small")
    cfg = tmp_path / "c.json"
    out = tmp_path / "out"
    cfg.write_text(json.dumps({"input_folder": info["frames_dir"], "output_folder": str(out)}))
    before = list(logging.getLogger().handlers)
    assert zemosaic_cli.main([str(cfg), "--log-level", "INFO"]) == 0
    assert logging.getLogger().handlers == before
    log = (out / zw.LOG_NAME).read_text()
    assert "INFO zemosaic_worker: Scan: 6 usable frame(s)" in log
    assert "DEBUG" not in log


def test_a_closed_pipe_ends_a_finished_run_quietly(tmp_path):
    """`python -m zemosaic_worker c.json | head` must not end a good run with a traceback."""
    import subprocess
    import sys

    info = zemosaic_synth.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=3, seed=5,
                                           size="small")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": info["frames_dir"], "output_folder": str(tmp_path / "o")}))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the summary is printed
    done = subprocess.run([sys.executable, "-m", "zemosaic_worker", str(cfg)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


def _loaded(pid: int, library: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return library in fh.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see the imports")
def test_ctrl_c_while_the_libraries_load_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C in the first second, while NumPy and astropy are imported, ends like Ctrl-C during
    the run: one line, exit 130, no KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": str(tmp_path), "output_folder": str(tmp_path / "o")}))
    proc = subprocess.Popen([sys.executable, "-m", "zemosaic_worker", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _loaded(proc.pid, "_multiarray_umath") and time.monotonic() < deadline:
        time.sleep(0.002)
    in_imports = not _loaded(proc.pid, "astropy")  # astropy's compiled parts load after NumPy
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert in_imports
    assert proc.returncode == 130, err
    assert err.strip() == "zemosaic: interrupted; no mosaic written" and out == ""


def test_a_run_on_a_terminal_keeps_every_line_within_80_columns_and_logs_off_the_bars(tmp_path):
    """On a terminal (a pseudo-terminal here, 80 columns) the bars, the log records (a long
    output path, an unknown key's warning) and the summary each fit 80 columns, and no log
    record is written into the middle of a bar."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(2, 1), frames_per_panel=3, seed=5,
                                           size="small")
    out = tmp_path / ("an_output_folder_with_a_name_long_enough_to_need_wrapping_" * 2)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": info["frames_dir"], "output_folder": str(out),
                               "an_unknown_key_of_some_length": 1}))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "zemosaic_worker", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the program closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    assert any(line.startswith("master_tiles") for line in lines)  # bars were drawn
    assert any("an_unknown_key_of_some_length" in line for line in lines)
    assert any(line.startswith("ZeMosaic ") and "mosaic done" in line for line in lines)
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    levels = ("DEBUG ", "INFO ", "WARNING ", "ERROR ")
    merged = [line for line in lines if any(f" {lv}zemosaic" in line or f"{lv}zemosaic" in line[1:]
                                            for lv in levels) and not line.startswith(levels)]
    assert not merged, merged
