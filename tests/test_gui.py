"""The PySide6 window: log filtering, whole runs, cancel, folder validation, settings, cleanup."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import gc  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

import zemosaic_gui  # noqa: E402
import zemosaic_synth  # noqa: E402
from zemosaic_config import MosaicConfig  # noqa: E402
from zemosaic_worker import MOSAIC_NAME  # noqa: E402

RUN_TIMEOUT_MS = 60_000


@pytest.fixture(autouse=True)
def config_home(tmp_path, monkeypatch):
    """Keep the remembered configuration away from the real home folder."""
    folder = tmp_path / "config_home"
    monkeypatch.setenv(zemosaic_gui.CONFIG_DIR_ENV, str(folder))
    return folder


@pytest.fixture(autouse=True)
def destroy_closed_windows_in_gui_thread(qapp):
    """Delete the windows pytest-qt closed (deleteLater) and collect their wrappers now.

    Left to Python's cyclic garbage collector, a dropped window could be destroyed on the next
    test's worker thread, and Qt widgets may only be destroyed in the GUI thread.
    """
    yield
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


@pytest.fixture
def window(qtbot):
    """A shown window whose error boxes are recorded instead of blocking."""
    win = zemosaic_gui.MainWindow(MosaicConfig())
    errors = win.errors = []  # the recorder must not refer to the window (no reference cycle)
    win._show_error = lambda title, text: errors.append((title, text))
    qtbot.addWidget(win)
    win.show()
    return win


@pytest.fixture(scope="module")
def tiny_frames(tmp_path_factory):
    """1 x 2 panels x 3 small frames: the whole pipeline runs in a few seconds."""
    info = zemosaic_synth.generate_dataset(tmp_path_factory.mktemp("tiny"), panels=(1, 2),
                                           frames_per_panel=3, size="small")
    return info["frames_dir"]


@pytest.fixture(scope="module")
def medium_frames(tmp_path_factory):
    """2 x 2 panels x 4 small frames: a run lasts long enough to be cancelled mid-way."""
    info = zemosaic_synth.generate_dataset(tmp_path_factory.mktemp("medium"), panels=(2, 2),
                                           frames_per_panel=4, size="small")
    return info["frames_dir"]


def _log_lines(win):
    return win.log_view.toPlainText().splitlines()


def _emit_three(marker):
    log = logging.getLogger("zemosaic_worker")
    log.debug("debug %s", marker)
    log.info("info %s", marker)
    log.error("error %s", marker)


def test_log_level_dropdown_filters_panel(window):
    window.log_level_combo.setCurrentText("ERROR")
    assert logging.getLogger("zemosaic_worker").level == logging.ERROR
    assert window.log_handler.level == logging.ERROR
    _emit_three("A")
    text = window.log_view.toPlainText()
    assert "error A" in text
    assert "info A" not in text and "debug A" not in text

    window.clear_log_button.click()
    assert window.log_view.toPlainText() == ""

    window.log_level_combo.setCurrentText("DEBUG")
    assert logging.getLogger("zemosaic_worker").level == logging.DEBUG
    for module in ("zemosaic_align_stack", "zemosaic_photometry", "zemosaic_astrometry", "zemosaic_solve"):
        assert logging.getLogger(module).level == logging.DEBUG, module
    _emit_three("B")
    lines = _log_lines(window)
    assert [any(f"{kind} B" in line for line in lines) for kind in ("debug", "info", "error")] \
        == [True, True, True]

    window.log_level_combo.setCurrentText("INFO")
    _emit_three("C")
    text = window.log_view.toPlainText()
    assert "info C" in text and "error C" in text and "debug C" not in text


def test_initial_log_level_comes_from_config(qtbot):
    win = zemosaic_gui.MainWindow(MosaicConfig(logging_level="WARNING"))
    qtbot.addWidget(win)
    assert win.log_level_combo.currentText() == "WARNING"
    assert logging.getLogger("zemosaic_worker").level == logging.WARNING


def test_invalid_input_folder_disables_start(window, tmp_path):
    window.output_edit.setText(str(tmp_path / "out"))
    window.input_edit.setText(str(tmp_path))
    assert window.start_button.isEnabled()
    assert window.input_message.text() == ""

    window.input_edit.setText(str(tmp_path / "does_not_exist"))
    assert not window.start_button.isEnabled()
    assert "not found" in window.input_message.text()

    window.input_edit.setText("")
    assert not window.start_button.isEnabled()
    assert window.input_message.text()

    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "no_parent" / "out"))
    assert not window.start_button.isEnabled()
    assert "Parent folder not found" in window.output_message.text()


def test_an_astap_path_that_points_nowhere_disables_start(window, tmp_path):
    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    window.option_widgets[("astap_executable_path", None)].setText(str(tmp_path / "astap"))
    assert not window.start_button.isEnabled()
    assert "astap_executable_path" in window.start_message.text()
    assert "no program at" in window.start_message.text()
    window.option_widgets[("astap_executable_path", None)].setText("")
    assert window.start_button.isEnabled()


def test_invalid_option_names_the_key_next_to_start(window, tmp_path):
    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    window.option_widgets[("max_raw_per_master_tile", None)].setValue(1)
    assert not window.start_button.isEnabled()
    assert "max_raw_per_master_tile" in window.start_message.text()
    window.option_widgets[("max_raw_per_master_tile", None)].setValue(2)
    assert window.start_button.isEnabled()
    assert window.start_message.text() == ""


def test_whole_run_shows_preview_and_summary(window, qtbot, tiny_frames, tmp_path):
    out = tmp_path / "out"
    window.input_edit.setText(tiny_frames)
    window.output_edit.setText(str(out))
    window.start_button.click()
    assert not window.start_button.isEnabled() and window.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert window.errors == []
    assert window.status_label.text().startswith("Done")
    assert not window.preview_label.pixmap().isNull()
    assert "frames used: 6" in window.summary_label.text()
    assert str(out / MOSAIC_NAME) in window.output_path_label.text()
    assert window.open_folder_button.isEnabled()
    assert window.start_button.isEnabled() and not window.cancel_button.isEnabled()
    assert "Scan: 6 usable frame(s)" in window.log_view.toPlainText()
    # The configuration of a started run is remembered.
    assert os.path.exists(zemosaic_gui.last_config_path())


def test_cancel_leaves_no_mosaic_and_window_ready(window, qtbot, medium_frames, tmp_path):
    out = tmp_path / "out"
    window.input_edit.setText(medium_frames)
    window.output_edit.setText(str(out))
    window.start_button.click()
    qtbot.waitUntil(lambda: window.progress_bar.value() > 0 or not window.running,
                    timeout=RUN_TIMEOUT_MS)
    assert window.running, "the run ended before it could be cancelled"
    window.cancel_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert window.status_label.text() == "Cancelled"
    assert window.errors == []
    assert not (out / MOSAIC_NAME).exists()
    assert window.start_button.isEnabled()
    assert not window.cancel_button.isEnabled()


def test_cancel_with_workers_stops_running_tiles_and_the_next_run_reuses_the_written_ones(
        window, qtbot, medium_frames, tmp_path):
    """Cancel while tiles run in the process pool: the run ends within seconds, every tile file
    written is in the manifest, and the next Start reuses exactly those tiles."""
    import json
    import time

    import zemosaic_runstate
    import zemosaic_worker

    out = tmp_path / "out"
    window.input_edit.setText(medium_frames)
    window.output_edit.setText(str(out))
    window.option_widgets[("num_processing_workers", None)].setValue(2)
    window.start_button.click()
    qtbot.waitUntil(lambda: "done" in window.phase_label.text() or not window.running,
                    timeout=RUN_TIMEOUT_MS)
    assert window.running, "the run ended before it could be cancelled"
    clicked = time.monotonic()
    window.cancel_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert time.monotonic() - clicked < 5.0
    assert window.status_label.text() == "Cancelled"
    tiles_dir = out / zemosaic_worker.TILES_DIR
    written = sorted(p.name for p in tiles_dir.glob("master_tile_*.fits"))
    assert written and written == sorted(zemosaic_runstate.TileManifest(str(tiles_dir)).entries)
    window.start_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert window.status_label.text() != "Cancelled" and window.errors == []
    report = json.loads((out / zemosaic_worker.REPORT_NAME).read_text())
    assert sorted(zemosaic_worker.tile_name(t["index"]) for t in report["tiles"] if t["reused"]) == written


def test_live_mode_shows_each_mosaic_and_cancel_ends_it_keeping_the_last(window, qtbot, medium_frames, tmp_path):
    out = tmp_path / "out"
    window.input_edit.setText(medium_frames)
    window.output_edit.setText(str(out))
    window.live_check.setChecked(True)
    window.start_button.click()
    qtbot.waitUntil(lambda: window.status_label.text().startswith("Live: mosaic 1") or not window.running,
                    timeout=RUN_TIMEOUT_MS)
    assert window.running and window.preview_view.has_image()
    assert not window.live_check.isEnabled()  # a setting of the run, fixed while it goes on
    window.cancel_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert window.status_label.text() == "Live mode stopped after 1 mosaic(s)"
    assert window.errors == [] and (out / MOSAIC_NAME).exists() and window.preview_view.has_image()
    assert window.live_check.isEnabled()


def test_failure_shows_readable_message(window, qtbot, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    window.input_edit.setText(str(empty))
    window.output_edit.setText(str(tmp_path / "out"))
    window.start_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert len(window.errors) == 1
    title, text = window.errors[0]
    assert "no usable frame" in text and "Traceback" not in text
    assert window.status_label.text() == "Failed"
    assert "no usable frame" in window.log_view.toPlainText()


def test_closing_during_a_run_stops_it_cleanly(qtbot, medium_frames, tmp_path):
    win = zemosaic_gui.MainWindow(MosaicConfig(input_folder=medium_frames,
                                               output_folder=str(tmp_path / "out")))
    qtbot.addWidget(win)
    handler = win.log_handler
    win.start_run()
    qtbot.waitUntil(lambda: win.progress_bar.value() > 0, timeout=RUN_TIMEOUT_MS)
    win.close()  # cancels and waits for the worker thread
    assert win._thread is None or win._thread.isFinished()
    assert handler not in logging.getLogger().handlers
    assert not (tmp_path / "out" / MOSAIC_NAME).exists()


def test_unexpected_error_shows_type_and_message(window, qtbot, tmp_path, monkeypatch):
    def boom(config, progress=None, cancel=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(zemosaic_gui.zemosaic_worker, "run_mosaic", boom)
    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    window.start_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert window.errors == [("Unexpected error", "RuntimeError: disk on fire")]
    assert "RuntimeError: disk on fire" in window.log_view.toPlainText()
    assert window.start_button.isEnabled()


def _choose(combo, value):
    """Select the drop-down item whose data (the JSON value) is ``value``."""
    index = combo.findData(value)
    assert index >= 0, value
    combo.setCurrentIndex(index)


def _change_several_widgets(win, tmp_path):
    win.input_edit.setText(str(tmp_path))
    win.output_edit.setText(str(tmp_path / "out"))
    widgets = win.option_widgets
    _choose(widgets[("stacking_rejection_algorithm", None)], "kappa_sigma")
    _choose(widgets[("stacking_final_combine_method", None)], "median")
    widgets[("stacking_kappa_low", None)].setValue(2.5)
    widgets[("stacking_winsor_limits", 1)].setValue(0.1)
    widgets[("max_raw_per_master_tile", None)].setValue(12)
    widgets[("correct_hot_pixels", None)].setChecked(False)
    widgets[("two_pass_coverage_renorm", None)].setChecked(True)
    widgets[("two_pass_cov_gain_clip", 0)].setValue(0.9)
    _choose(widgets[("assembly_engine", None)], "reproject")
    widgets[("save_channel_files", None)].setChecked(True)
    widgets[("save_final_as_uint16", None)].setChecked(True)
    win.log_level_combo.setCurrentText("DEBUG")


def test_settings_survive_save_and_load(window, tmp_path):
    _change_several_widgets(window, tmp_path)
    wanted = window.config_from_widgets()
    assert wanted != MosaicConfig(input_folder=str(tmp_path), output_folder=str(tmp_path / "out"))
    path = tmp_path / "settings.json"
    assert window.save_config_to(str(path))
    window.apply_config(MosaicConfig())
    assert window.config_from_widgets() == MosaicConfig()
    assert window.load_config_from(str(path))
    assert window.config_from_widgets() == wanted
    assert wanted.stacking_winsor_limits == (0.05, 0.1)
    assert wanted.two_pass_cov_gain_clip == (0.9, 1.18)
    assert wanted.save_channel_files and wanted.save_final_as_uint16


def test_bad_settings_file_names_the_key(window, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"stacking_kappa_low": -1}', encoding="utf-8")
    assert not window.load_config_from(str(path))
    (title, text), = window.errors
    assert "stacking_kappa_low" in text
    assert window.config_from_widgets() == MosaicConfig()


def test_last_config_restored_in_new_window(qtbot, tmp_path, config_home):
    first = zemosaic_gui.MainWindow(MosaicConfig())
    qtbot.addWidget(first)
    _change_several_widgets(first, tmp_path)
    wanted = first.config_from_widgets()
    first.close()
    assert (config_home / zemosaic_gui.LAST_CONFIG_NAME).exists()
    second = zemosaic_gui.MainWindow()
    qtbot.addWidget(second)
    assert second.config_from_widgets() == wanted


def test_handler_removed_when_window_closes(qtbot):
    before = logging.getLogger("zemosaic_worker").level
    win = zemosaic_gui.MainWindow(MosaicConfig(logging_level="DEBUG"))
    qtbot.addWidget(win)
    handler = win.log_handler
    assert handler in logging.getLogger().handlers
    assert sum(isinstance(h, zemosaic_gui.QtLogHandler) for h in logging.getLogger().handlers) == 1
    win.close()
    assert handler not in logging.getLogger().handlers
    assert logging.getLogger("zemosaic_worker").level == before


def test_gpu_switch_explains_why_when_unavailable(window):
    box = window.option_widgets[("use_gpu_phase5", None)]
    reason = zemosaic_gui.gpu_unavailable_reason()
    assert box.isEnabled() == (reason is None)
    if reason is not None:
        assert reason in box.toolTip()


def test_tooltips_and_choices_come_from_config_tables(window):
    from zemosaic_config import CHOICES, FIELD_HELP

    for spec in zemosaic_gui.OPTION_SPECS:
        widget = window.option_widgets[spec.key]
        assert widget.toolTip().startswith(FIELD_HELP[spec.field])
        if spec.field in CHOICES:
            assert [widget.itemData(i) for i in range(widget.count())] == list(CHOICES[spec.field])


def test_module_imports_without_display():
    import subprocess
    import sys

    env = {**os.environ, "QT_QPA_PLATFORM": ""}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import zemosaic_gui, PySide6.QtWidgets as w; assert w.QApplication.instance() is None"
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=60)


def test_drop_downs_show_plain_words_and_keep_json_values(window):
    rejection = window.option_widgets[("stacking_rejection_algorithm", None)]
    assert rejection.currentText() == "Winsorized sigma clip"
    assert rejection.currentData() == "winsorized_sigma_clip"
    normalize = window.option_widgets[("stacking_normalize_method", None)]
    assert normalize.currentText() == "Match stars (gain and sky)"
    engine = window.option_widgets[("assembly_engine", None)]
    assert engine.currentText().startswith("Fast")
    # Every value of every drop-down has a plain-words name of its own.
    for field, labels in zemosaic_gui.CHOICE_LABELS.items():
        combo = window.option_widgets[(field, None)]
        texts = [combo.itemText(i) for i in range(combo.count())]
        assert set(labels) == {combo.itemData(i) for i in range(combo.count())}
        assert all("_" not in text for text in texts) and len(set(texts)) == len(texts)
    _choose(rejection, "kappa_sigma")
    assert rejection.currentText() == "Kappa-sigma clip"
    assert window.config_from_widgets().stacking_rejection_algorithm == "kappa_sigma"


def _editable(win, field, part=None):
    widget, label = win.option_widgets[(field, part)], win.option_labels[(field, part)]
    assert widget.isEnabled() == label.isEnabled()
    return widget.isEnabled()


def test_dependent_options_follow_their_switch(window):
    two_pass = window.option_widgets[("two_pass_coverage_renorm", None)]
    dependents = [("two_pass_cov_sigma_px", None), ("two_pass_cov_gain_clip", 0),
                  ("two_pass_cov_gain_clip", 1)]
    assert not two_pass.isChecked()
    assert not any(_editable(window, *key) for key in dependents)
    two_pass.setChecked(True)
    assert all(_editable(window, *key) for key in dependents)

    rejection = window.option_widgets[("stacking_rejection_algorithm", None)]
    clip = [("stacking_kappa_low", None), ("stacking_kappa_high", None),
            ("stacking_kappa_max_iterations", None)]
    winsor = [("stacking_winsor_limits", 0), ("stacking_winsor_limits", 1)]
    assert all(_editable(window, *key) for key in clip + winsor)  # winsorized sigma clip
    _choose(rejection, "kappa_sigma")
    assert all(_editable(window, *key) for key in clip)
    assert not any(_editable(window, *key) for key in winsor)
    window.option_widgets[("stacking_kappa_low", None)].setValue(2.5)
    _choose(rejection, "none")
    assert not any(_editable(window, *key) for key in clip + winsor)
    # A greyed-out setting keeps its value in the configuration.
    assert window.config_from_widgets().stacking_kappa_low == 2.5

    window.apply_config(MosaicConfig(two_pass_coverage_renorm=False))
    assert not any(_editable(window, *key) for key in dependents)
    assert all(_editable(window, *key) for key in clip + winsor)


def test_save_keeps_the_unknown_keys_of_a_loaded_file(window, tmp_path):
    import json

    upstream = {"input_dir": str(tmp_path), "stacking_kappa_low": 2.0,
                "match_background_for_final": False, "final_assembly_method": "incremental",
                "qt_theme_mode": "dark", "anchor_quality_span_range": [0.02, 6.0],
                "global_wcs_res_override": None}
    path = tmp_path / "zemosaic_config.json"
    path.write_text(json.dumps(upstream), encoding="utf-8")
    assert window.load_config_from(str(path))
    assert not window.option_widgets[("match_background", None)].isChecked()
    window.option_widgets[("stacking_kappa_high", None)].setValue(4.0)
    saved_path = tmp_path / "saved.json"
    assert window.save_config_to(str(saved_path))
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    for key in ("final_assembly_method", "qt_theme_mode", "anchor_quality_span_range",
                "global_wcs_res_override"):
        assert saved[key] == upstream[key]
    assert saved["input_folder"] == str(tmp_path) and saved["match_background"] is False
    assert saved["stacking_kappa_low"] == 2.0 and saved["stacking_kappa_high"] == 4.0
    # The remembered settings keep them too.
    window.close()
    remembered = json.loads(open(zemosaic_gui.last_config_path(), encoding="utf-8").read())
    assert remembered["qt_theme_mode"] == "dark"


def _fake_run(monkeypatch, tmp_path, outcome):
    """Make the window's runs end at once: with a 1600 x 1000 preview, or by raising ``outcome``."""
    from types import SimpleNamespace

    from PySide6.QtGui import QColor, QImage

    def run(config, progress=None, cancel=None):
        if outcome is not None:
            raise outcome
        png = str(tmp_path / "preview.png")
        image = QImage(1600, 1000, QImage.Format.Format_RGB32)
        image.fill(QColor(40, 80, 120))
        assert image.save(png)
        return SimpleNamespace(paths={"preview": png, "mosaic": str(tmp_path / MOSAIC_NAME)},
                               elapsed_s=1.0, report={})

    monkeypatch.setattr(zemosaic_gui.zemosaic_worker, "run_mosaic", run)
    monkeypatch.setattr(zemosaic_gui.zemosaic_cli, "format_summary", lambda result, brief=False: "summary")


def _run_once(win, qtbot):
    win.start_button.click()
    qtbot.waitUntil(lambda: not win.running, timeout=RUN_TIMEOUT_MS)


def test_last_good_preview_stays_after_failure_and_cancel(window, qtbot, tmp_path, monkeypatch):
    from zemosaic_worker import Cancelled, PipelineError

    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    _fake_run(monkeypatch, tmp_path, None)
    _run_once(window, qtbot)
    assert window.status_label.text().startswith("Done")
    good = window.preview_view.image().toImage()
    assert not good.isNull() and window.preview_caption.text() == ""

    _fake_run(monkeypatch, tmp_path, PipelineError("no usable frame"))
    _run_once(window, qtbot)
    assert window.status_label.text() == "Failed" and len(window.errors) == 1
    assert window.preview_view.image().toImage() == good
    assert "failed" in window.preview_caption.text()

    _fake_run(monkeypatch, tmp_path, Cancelled("cancelled by user"))
    _run_once(window, qtbot)
    assert window.status_label.text() == "Cancelled"
    assert window.preview_view.image().toImage() == good
    assert "Cancelled" in window.preview_caption.text()


def test_failure_without_earlier_preview_says_so(window, qtbot, tmp_path, monkeypatch):
    from zemosaic_worker import PipelineError

    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    _fake_run(monkeypatch, tmp_path, PipelineError("no usable frame"))
    _run_once(window, qtbot)
    assert window.preview_label.pixmap().isNull()
    assert window.preview_label.text() == "No mosaic: the run failed."


def test_preview_zooms_between_fit_and_100_percent(window, qtbot, tmp_path, monkeypatch):
    window.input_edit.setText(str(tmp_path))
    window.output_edit.setText(str(tmp_path / "out"))
    _fake_run(monkeypatch, tmp_path, None)
    _run_once(window, qtbot)
    view = window.preview_view
    fitted = window.preview_label.pixmap().size()
    viewport = view.viewport().size()
    assert view.fit and fitted.width() <= viewport.width() and fitted.height() <= viewport.height()
    assert fitted.width() < 1600

    window.zoom_actual_button.click()
    assert not view.fit
    assert (window.preview_label.pixmap().width(), window.preview_label.pixmap().height()) \
        == (1600, 1000)
    assert view.horizontalScrollBar().maximum() > 0  # larger than the view: it scrolls

    window.zoom_fit_button.click()
    assert view.fit and window.preview_label.pixmap().size() == fitted
    # Fitted, the preview follows the window's size.
    window.resize(1500, 1000)
    qtbot.waitUntil(lambda: window.preview_label.pixmap().width() > fitted.width(), timeout=5000)


def test_the_window_fits_a_1366x768_laptop(qtbot):
    win = zemosaic_gui.MainWindow(MosaicConfig())
    qtbot.addWidget(win)
    minimum = win.minimumSizeHint()
    # 768 px less a title bar and a panel: what a laptop screen gives a window.
    assert minimum.width() <= 1366 - 16 and minimum.height() <= 768 - 40
    win.resize(1350, 728)
    win.splitter.setSizes([win.splitter.widget(0).minimumSizeHint().height(), 10_000])
    win.show()
    qtbot.waitExposed(win)
    lines = win.log_view.viewport().height() / win.log_view.fontMetrics().lineSpacing()
    assert lines >= zemosaic_gui.LOG_LINES


def test_the_window_remembers_its_size_and_splitter(qtbot):
    first = zemosaic_gui.MainWindow(MosaicConfig())
    qtbot.addWidget(first)
    first.show()
    first.resize(1250, 700)
    first.splitter.setSizes([450, 230])
    qtbot.wait(10)
    sizes = first.splitter.sizes()
    first.close()
    second = zemosaic_gui.MainWindow(MosaicConfig())
    qtbot.addWidget(second)
    second.show()
    qtbot.waitExposed(second)
    # The offscreen platform's screen is 800 px wide: Qt keeps a restored window's width within it
    # (here down to the window's minimum), its height and the splitter as they were.
    assert second.height() == 700 and second.width() == min(1250, max(800, second.minimumSizeHint().width()))
    assert second.splitter.sizes() == sizes


def test_a_log_level_change_refilters_what_the_panel_shows(window, qtbot):
    log = logging.getLogger("zemosaic_worker")
    window.set_log_level("INFO")
    log.info("an info line")
    log.warning("a warning line")
    qtbot.waitUntil(lambda: "a warning line" in window.log_view.toPlainText())
    window.set_log_level("WARNING")
    shown = window.log_view.toPlainText()
    assert "a warning line" in shown and "an info line" not in shown
    window.set_log_level("INFO")
    shown = window.log_view.toPlainText()
    assert "an info line" in shown and shown.index("an info line") < shown.index("a warning line")
