"""Render docs/screenshot.png: the ZeMosaic window after a run on a tiny synthetic dataset.

Usage: ``python scripts/render_screenshot.py [OUTPUT.png]`` (runs offscreen; no display needed).
The dataset, the outputs and the remembered configuration all live in a temporary folder, so
neither the user's home nor the repository is touched apart from the PNG.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PySide6.QtWidgets import QApplication  # noqa: E402

import zemosaic_gui  # noqa: E402
import zemosaic_synth  # noqa: E402
from zemosaic_config import MosaicConfig  # noqa: E402

WINDOW_SIZE = (1200, 800)
TIMEOUT_S = 120.0


def wait_for_run(app: QApplication, window: zemosaic_gui.MainWindow, timeout_s: float) -> None:
    """Process events until the window's run ends; raises TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while window.running:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo run did not finish in {timeout_s:.0f} s")
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def render(output_png: str) -> None:
    """Run the window on a demo dataset and save its picture to ``output_png``."""
    with tempfile.TemporaryDirectory(prefix="zemosaic_shot_") as tmp:
        os.environ[zemosaic_gui.CONFIG_DIR_ENV] = os.path.join(tmp, "config")
        frames = zemosaic_synth.generate_dataset(os.path.join(tmp, "demo"), panels=(2, 2),
                                                 frames_per_panel=8, seed=1,
                                                 size="small")["frames_dir"]
        app = QApplication.instance() or QApplication(sys.argv[:1])
        window = zemosaic_gui.MainWindow(MosaicConfig(
            input_folder=frames, output_folder=os.path.join(tmp, "demo", "mosaic"),
            two_pass_coverage_renorm=True))
        window._show_error = lambda title, text: print(f"{title}: {text}", file=sys.stderr)
        window.resize(*WINDOW_SIZE)
        window.show()
        app.processEvents()
        window.start_run()
        wait_for_run(app, window, TIMEOUT_S)
        if window.status_label.text() == "Failed" or window.preview_label.pixmap().isNull():
            raise SystemExit("the demo run did not produce a preview; no screenshot written")
        window.input_edit.setCursorPosition(0)
        window.output_edit.setCursorPosition(0)
        app.processEvents()
        os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
        if not window.grab().save(output_png):
            raise SystemExit(f"could not write {output_png}")
        window.close()
    print(f"wrote {output_png}")


if __name__ == "__main__":
    render(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "screenshot.png"))
