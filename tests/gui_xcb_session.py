"""Open the real ZeMosaic window (Qt's xcb platform), run one mosaic, save a screenshot.

Run under an X server (``xvfb-run -s "-screen 0 1366x768x24" python tests/gui_xcb_session.py
INPUT OUTPUT SHOT.png``) by tests/test_gui_xcb.py; prints one JSON line of what it saw.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("ZEMOSAIC_CONFIG_DIR", tempfile.mkdtemp(prefix="zemosaic_gui_"))

from PySide6.QtWidgets import QApplication  # noqa: E402

import zemosaic_gui  # noqa: E402

TIMEOUT_S = 240


def main(input_folder: str, output_folder: str, shot: str) -> int:
    app = QApplication(sys.argv)
    window = zemosaic_gui.MainWindow()
    errors = []
    window._show_error = lambda title, text: errors.append(f"{title}: {text}")
    window.show()
    app.processEvents()
    log = window.log_view
    seen = {"platform": app.platformName(),
            "screen": [window.screen().availableGeometry().width(), window.screen().availableGeometry().height()],
            "minimum": [window.minimumSizeHint().width(), window.minimumSizeHint().height()],
            "size": [window.width(), window.height()],
            "log_lines": log.viewport().height() / log.fontMetrics().lineSpacing()}
    window.input_edit.setText(input_folder)
    window.output_edit.setText(output_folder)
    window.start_button.click()
    deadline = time.monotonic() + TIMEOUT_S
    while (window.running or not window.status_label.text()) and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()
    seen.update(status=window.status_label.text(), errors=errors,
                preview=not window.preview_label.pixmap().isNull(),
                screenshot=window.grab().save(shot))
    window.close()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
