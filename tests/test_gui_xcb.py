"""The real window on Qt's xcb platform (an X server from xvfb-run), as a user opens it: it starts,
fits a 1366x768 laptop screen with ten log lines, runs the shared real subs and shows the preview.
The quick window tests use QT_QPA_PLATFORM=offscreen (tests/test_gui.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from realdata import NGC7023

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("xvfb-run") is None,
                       reason="no xvfb-run (Debian/Ubuntu: apt-get install xvfb)"),
    pytest.mark.skipif(not NGC7023.is_dir(), reason=f"no shared real subs at {NGC7023}"),
]


def test_the_real_window_fits_a_laptop_and_runs_real_subs(tmp_path):
    pytest.importorskip("PySide6")
    shot = tmp_path / "window.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "ZEMOSAIC_CONFIG_DIR": str(tmp_path / "cfg")}
    done = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1366x768x24", sys.executable,
         str(ROOT / "tests" / "gui_xcb_session.py"), str(NGC7023), str(tmp_path / "out"), str(shot)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["platform"] == "xcb"
    assert seen["screen"] == [1366, 768]
    assert seen["size"][0] <= 1366 and seen["size"][1] <= 768 - 40  # room for a title bar
    assert seen["minimum"][0] <= 1366 and seen["minimum"][1] <= 768 - 40
    assert seen["log_lines"] >= 10
    assert seen["errors"] == [] and seen["status"].startswith("Done"), seen
    assert seen["preview"] and seen["screenshot"] and shot.stat().st_size > 10_000
    docs_shot = os.environ.get("ZEMOSAIC_SCREENSHOT")  # e.g. docs/screenshot.png, to refresh it
    if docs_shot:
        shutil.copyfile(shot, docs_shot)
