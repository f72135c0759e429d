"""PySide6 window for ZeMosaic: folders, options, log panel, progress, cancel and preview.

Options are described once, in :data:`OPTION_SPECS` (which widget edits which configuration
field, and which switch makes it matter) and :data:`CHOICE_LABELS` (the plain-words names of the
drop-down values, whose JSON spelling stays the item's data). Keys of a loaded file that this
program does not use are kept and written back by Save. The preview keeps the last good result
when a run fails or is cancelled, and shows it fitted or at 100 %.

Started with ``python -m zemosaic_gui [CONFIG.json]`` or the ``zemosaic`` command. The window
only collects a :class:`~zemosaic_config.MosaicConfig` and hands it to
:func:`zemosaic_worker.run_mosaic` on a worker thread; it holds no pipeline logic.

Threading: the run happens in a :class:`QThread`. The pipeline's progress callback and every log
record emitted on the worker thread reach the widgets through Qt signals, which Qt queues to the
GUI thread, so no widget is ever touched from the worker. Cancel sets the ``threading.Event`` the
worker checks between frames and tiles.

Logging: one :class:`QtLogHandler` on the root logger (the common ancestor of the pipeline
loggers) forwards formatted records to the log panel; the level drop-down sets the level of the
pipeline loggers and of that handler. The handler is removed and the logger levels restored when
the window closes.

The module imports without a display; only :func:`main` creates the ``QApplication``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

try:
    from PySide6.QtCore import QByteArray, QObject, QSettings, QStandardPaths, Qt, QThread, QUrl, Signal
    from PySide6.QtGui import QDesktopServices, QPixmap
    from PySide6.QtWidgets import (QApplication, QButtonGroup, QCheckBox, QComboBox,
                                   QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout,
                                   QGroupBox, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                                   QMessageBox, QPlainTextEdit, QProgressBar, QPushButton,
                                   QScrollArea, QSizePolicy, QSpinBox, QSplitter, QVBoxLayout,
                                   QWidget)
except ImportError as exc:  # the GUI is an optional extra
    raise ImportError("the ZeMosaic window needs PySide6: pip install 'zemosaic[gui]'") from exc

import zemosaic_cli
import zemosaic_watch
import zemosaic_worker
from zemosaic_config import (CHOICES, FIELD_HELP, ConfigError, MosaicConfig, read_config_file,
                             save_config)
from zemosaic_utils import gpu_unavailable_reason

logger = logging.getLogger(__name__)

#: Loggers whose level the log drop-down controls: the project's modules, this window among them.
PIPELINE_LOGGERS = zemosaic_cli.pipeline_logger_names()
LOG_LEVELS = CHOICES["logging_level"]
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: The window's first size, shrunk to the screen's (a 1366x768 laptop: 1350x728).
DEFAULT_SIZE = (1200, 800)
#: Records the log panel keeps to show again when its level changes.
LOG_KEPT_RECORDS = 20000
#: Log lines the log panel shows at the first start, on any screen from 1366x768 up.
LOG_LINES = 10
#: The log panel's height besides its lines: its title, level row and margins (px).
LOG_PANEL_CHROME_PX = 84
CONFIG_DIR_ENV = "ZEMOSAIC_CONFIG_DIR"
LAST_CONFIG_NAME = "last_config.json"
_ERROR_STYLE = "color: #c62828;"
_DEFAULT_FIELDS = {f.name: f.default for f in dataclasses.fields(MosaicConfig)}


# --------------------------------------------------------------------------------------------------
# Option table: which widget edits which configuration field
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """One option widget: the config field it edits (or one half of a ``(low, high)`` pair).

    The widget kind follows the field: a drop-down for fields in :data:`CHOICES` (items named by
    :data:`CHOICE_LABELS`), a check box for true/false fields, a spin box for numbers
    (``minimum``..``maximum``; ``special`` is the text shown at the minimum, e.g. "automatic" for
    0). The tooltip is the field's :data:`FIELD_HELP`. ``enabled_if`` is ``(field, values)``: the
    widget is editable only while that other field holds one of ``values`` (a setting the run
    would not use is greyed out, its value kept).
    """

    group: str
    field: str
    label: str
    part: int | None = None
    minimum: float = 0.0
    maximum: float = 100.0
    step: float = 1.0
    decimals: int = 2
    special: str = ""
    enabled_if: tuple[str, tuple] | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        """Identifies the widget: the field name and the pair index (None for a whole field)."""
        return self.field, self.part


OPTION_GROUPS = ("Stacking", "Output", "Plate solving", "Mosaic", "Assembly")

# Which rejection uses which setting (zemosaic_align_stack): both clips use the kappas and the
# rounds, only the winsorized one the winsor limits.
_CLIPPING = ("stacking_rejection_algorithm", ("winsorized_sigma_clip", "kappa_sigma"))
_WINSORIZING = ("stacking_rejection_algorithm", ("winsorized_sigma_clip",))
_TWO_PASS_ON = ("two_pass_coverage_renorm", (True,))
_EXTRACTION_ON = ("final_background_extraction", (True,))

# The drizzle settings matter under Bayer drizzle only.
_DRIZZLE = ("stacking_cfa_method", ("bayer_drizzle",))

#: Plain-words names of the drop-down values; the JSON value stays the item's data.
CHOICE_LABELS: dict[str, dict[str, str]] = {
    "stacking_normalize_method": {"linear_fit": "Match stars (gain and sky)",
                                  "sky_mean": "Match sky level only", "none": "Leave as recorded"},
    "stacking_weighting_method": {"noise_variance": "Less noise, more weight",
                                  "none": "Equal weights"},
    "stacking_rejection_algorithm": {"winsorized_sigma_clip": "Winsorized sigma clip",
                                     "kappa_sigma": "Kappa-sigma clip", "none": "No rejection"},
    "stacking_final_combine_method": {"mean": "Mean", "median": "Median"},
    "align_method": {"astroalign": "Star matching", "wcs": "Plate solution only"},
    "stacking_cfa_method": {"debayer": "Debayer, then resample", "bayer_drizzle": "Bayer drizzle"},
    "drizzle_kernel": {"square": "Square drop", "point": "Point", "gaussian": "Gaussian"},
    "assembly_engine": {"fast": "Fast (CPU or GPU)", "reproject": "Reference (astropy reproject)"},
    "final_grid": {"north_up": "North up", "rotated": "Rotated (smallest canvas)"},
}

OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("Stacking", "stacking_normalize_method", "Normalisation"),
    OptionSpec("Stacking", "stacking_weighting_method", "Weighting"),
    OptionSpec("Stacking", "stacking_rejection_algorithm", "Rejection"),
    OptionSpec("Stacking", "stacking_kappa_low", "Kappa low", minimum=0.1, maximum=20.0, step=0.1,
               enabled_if=_CLIPPING),
    OptionSpec("Stacking", "stacking_kappa_high", "Kappa high", minimum=0.1, maximum=20.0, step=0.1,
               enabled_if=_CLIPPING),
    OptionSpec("Stacking", "stacking_kappa_max_iterations", "Rejection rounds", minimum=1,
               maximum=50, enabled_if=_CLIPPING),
    OptionSpec("Stacking", "stacking_winsor_limits", "Winsor limit low", part=0, maximum=0.49,
               step=0.01, decimals=3, enabled_if=_WINSORIZING),
    OptionSpec("Stacking", "stacking_winsor_limits", "Winsor limit high", part=1, maximum=0.49,
               step=0.01, decimals=3, enabled_if=_WINSORIZING),
    OptionSpec("Stacking", "stacking_final_combine_method", "Combine"),
    OptionSpec("Output", "save_channel_files", "One FITS per colour (SWarp, Montage)"),
    OptionSpec("Output", "save_final_as_uint16", "16-bit integer copy"),
    OptionSpec("Plate solving", "force_resolve_existing_wcs", "Solve frames that have a WCS"),
    OptionSpec("Plate solving", "plate_solve_timeout_s", "Time limit per frame (s)", minimum=1.0,
               maximum=3600.0, step=5.0, decimals=0),
    OptionSpec("Plate solving", "astap_default_search_radius", "Search radius (deg)",
               minimum=0.1, maximum=180.0, step=0.5, decimals=1),
    OptionSpec("Plate solving", "astap_executable_path", "ASTAP program (optional)"),
    OptionSpec("Mosaic", "cluster_panel_threshold", "Panel threshold (deg)", maximum=10.0,
               step=0.01, decimals=4, special="automatic"),
    OptionSpec("Mosaic", "max_raw_per_master_tile", "Max frames per master tile", maximum=100000,
               special="no cap"),
    OptionSpec("Mosaic", "num_processing_workers", "Workers", maximum=256,
               special="one per CPU core"),
    OptionSpec("Mosaic", "align_method", "Alignment"),
    OptionSpec("Mosaic", "stacking_cfa_method", "Colour samples"),
    OptionSpec("Mosaic", "drizzle_scale", "Drizzle scale", minimum=1, maximum=2, enabled_if=_DRIZZLE),
    OptionSpec("Mosaic", "drizzle_pixfrac", "Drizzle drop size", maximum=1.0, step=0.05, decimals=2,
               special="for the scale", enabled_if=_DRIZZLE),
    OptionSpec("Mosaic", "drizzle_kernel", "Drizzle kernel", enabled_if=_DRIZZLE),
    OptionSpec("Mosaic", "correct_hot_pixels", "Hot pixel correction"),
    OptionSpec("Mosaic", "saturation_level", "Saturation level (ADU)", maximum=4.3e9, step=100.0,
               decimals=0, special="from the frames"),
    OptionSpec("Mosaic", "watch_batch_frames", "Live: new mosaic every (frames)", minimum=1, maximum=100000),
    OptionSpec("Mosaic", "watch_batch_seconds", "Live: or after (s)", minimum=1.0, maximum=86400.0,
               step=30.0, decimals=0),
    OptionSpec("Assembly", "use_gpu_phase5", "Use GPU"),
    OptionSpec("Assembly", "assembly_engine", "Assembly engine"),
    OptionSpec("Assembly", "final_grid", "Mosaic orientation"),
    OptionSpec("Assembly", "match_background", "Match background"),
    OptionSpec("Assembly", "background_model_order", "Sky model order", maximum=2),
    OptionSpec("Assembly", "assembly_feather_px", "Feather width (px)", maximum=5000.0, step=16.0,
               decimals=0, special="no feathering"),
    OptionSpec("Assembly", "final_background_extraction", "Flatten the final background"),
    OptionSpec("Assembly", "final_background_order", "Final background order", minimum=1, maximum=2,
               enabled_if=_EXTRACTION_ON),
    OptionSpec("Assembly", "intertile_photometric_match", "Match tile gains"),
    OptionSpec("Assembly", "two_pass_coverage_renorm", "Two-Pass renormalisation"),
    OptionSpec("Assembly", "two_pass_cov_sigma_px", "Two-Pass smoothing (px)", maximum=5000.0,
               step=5.0, decimals=1, enabled_if=_TWO_PASS_ON),
    OptionSpec("Assembly", "two_pass_cov_gain_clip", "Gain clip low", part=0, minimum=0.01,
               maximum=1.0, step=0.01, decimals=3, enabled_if=_TWO_PASS_ON),
    OptionSpec("Assembly", "two_pass_cov_gain_clip", "Gain clip high", part=1, minimum=1.0,
               maximum=10.0, step=0.01, decimals=3, enabled_if=_TWO_PASS_ON),
)


def choice_label(field: str, value: str) -> str:
    """Return the plain-words name of a drop-down value (the value itself when it has none)."""
    return CHOICE_LABELS.get(field, {}).get(value, value)


def _make_option_widget(spec: OptionSpec) -> QWidget:
    """Return an unconnected widget for ``spec``, with its tooltip and range."""
    default = _DEFAULT_FIELDS[spec.field]
    if spec.part is not None:
        default = default[spec.part]
    if spec.field in CHOICES:
        widget = QComboBox()
        for index, value in enumerate(CHOICES[spec.field]):
            widget.addItem(choice_label(spec.field, value), value)
            # The JSON spelling, for a user comparing the window with a configuration file.
            widget.setItemData(index, f"In the JSON file: {value!r}", Qt.ItemDataRole.ToolTipRole)
    elif isinstance(default, bool):
        widget = QCheckBox()
    elif isinstance(default, str):
        widget = QLineEdit()
        widget.setPlaceholderText("empty: astrometry.net")
    else:
        if isinstance(default, int):
            widget = QSpinBox()
            widget.setRange(int(spec.minimum), int(spec.maximum))
            widget.setSingleStep(max(1, int(spec.step)))
        else:
            widget = QDoubleSpinBox()
            widget.setDecimals(spec.decimals)
            widget.setRange(spec.minimum, spec.maximum)
            widget.setSingleStep(spec.step)
        widget.setSpecialValueText(spec.special)
    widget.setToolTip(FIELD_HELP[spec.field])
    return widget


def _widget_value(widget: QWidget):
    """Return the value a widget made by :func:`_make_option_widget` holds."""
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QLineEdit):
        return widget.text().strip()
    return widget.value()


def _set_widget_value(widget: QWidget, value) -> None:
    """Show ``value`` in a widget made by :func:`_make_option_widget`."""
    if isinstance(widget, QComboBox):
        widget.setCurrentIndex(widget.findData(value))
    elif isinstance(widget, QCheckBox):
        widget.setChecked(bool(value))
    elif isinstance(widget, QLineEdit):
        widget.setText(str(value))
    else:
        widget.setValue(value)


def _connect_changed(widget: QWidget, slot) -> None:
    """Call ``slot`` whenever the user changes the widget's value."""
    if isinstance(widget, QComboBox):
        widget.currentIndexChanged.connect(slot)
    elif isinstance(widget, QCheckBox):
        widget.toggled.connect(slot)
    elif isinstance(widget, QLineEdit):
        widget.textChanged.connect(slot)
    else:
        widget.valueChanged.connect(slot)


# --------------------------------------------------------------------------------------------------
# Plain helpers (no widgets)
# --------------------------------------------------------------------------------------------------


def config_dir() -> str:
    """Return the folder holding the remembered configuration.

    ``$ZEMOSAIC_CONFIG_DIR`` when set (settings kept elsewhere: a portable install, a test), else the
    user's configuration folder plus ``zemosaic`` (``~/.config/zemosaic`` on Linux).
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return override
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    return os.path.join(base or os.path.expanduser("~/.config"), "zemosaic")


def last_config_path() -> str:
    """Return the path of the configuration remembered between sessions."""
    return os.path.join(config_dir(), LAST_CONFIG_NAME)


def load_last_config() -> tuple[MosaicConfig, dict] | None:
    """Return the remembered configuration and its unknown entries, or None when there is none
    or it is unusable."""
    path = last_config_path()
    if not os.path.exists(path):
        return None
    try:
        return read_config_file(path)
    except ConfigError as exc:
        logger.warning("Ignoring the remembered configuration: %s", exc)
        return None


def save_last_config(config: MosaicConfig, unknown: dict | None = None) -> None:
    """Remember ``config`` (and the ``unknown`` entries it was loaded with) for the next session.

    A failure is one WARNING, never an error.
    """
    try:
        os.makedirs(config_dir(), exist_ok=True)
        save_config(config, last_config_path(), unknown)
    except OSError as exc:
        logger.warning("Could not remember the configuration in %s: %s", config_dir(), exc)


def input_folder_problem(text: str) -> str | None:
    """Return why ``text`` cannot be the input folder, or None when it can."""
    path = os.path.expanduser(text.strip())
    if not path:
        return "Choose the folder that holds your frames."
    if not os.path.isdir(path):
        return "Folder not found."
    return None


def output_folder_problem(text: str) -> str | None:
    """Return why ``text`` cannot be the output folder, or None (it may not exist yet)."""
    path = os.path.expanduser(text.strip())
    if not path:
        return "Choose where the mosaic is written."
    if os.path.exists(path):
        return None if os.path.isdir(path) else "This is a file, not a folder."
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"Parent folder not found: {parent}"
    return None


def phase_title(phase: str) -> str:
    """Return the display name of a pipeline phase ("master_tiles" -> "Master tiles")."""
    return "Plate solving" if phase == "solve" else phase.replace("_", " ").capitalize()


# --------------------------------------------------------------------------------------------------
# Logging and the worker thread
# --------------------------------------------------------------------------------------------------


class _LogBridge(QObject):
    """Carries formatted log records to the GUI thread (signals are queued across threads)."""

    record = Signal(str, int)


class QtLogHandler(logging.Handler):
    """Forwards formatted log records to the window through a Qt signal; any thread may log."""

    def __init__(self, level: int = logging.NOTSET, parent: QObject | None = None):
        super().__init__(level)
        # Parented to the window, the bridge dies with it in the GUI thread; a record logged
        # after that is dropped (RuntimeError below) instead of reaching a deleted widget.
        self.bridge = _LogBridge(parent)
        self.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bridge.record.emit(self.format(record), record.levelno)
        except RuntimeError:
            pass  # the bridge was deleted with its window: nowhere to show the record
        except Exception:
            self.handleError(record)


class _RunThread(QThread):
    """Runs :func:`zemosaic_worker.run_mosaic` off the GUI thread and reports through signals."""

    progressed = Signal(str, int, int, str)
    succeeded = Signal(object)
    batch_done = Signal(object)  # live mode: a mosaic made, the watch goes on
    failed = Signal(str, str)  # title, one-line message
    cancelled = Signal()

    def __init__(self, config: MosaicConfig, parent: QObject | None = None, live: bool = False):
        super().__init__(parent)
        self.config, self.live = config, live
        self.cancel_event = threading.Event()

    def _progress(self, phase: str, done: int, total: int, message: str = "") -> None:
        self.progressed.emit(phase, int(done), int(total), str(message))

    def run(self) -> None:
        try:
            if self.live:  # ends with Cancelled when the user stops it
                zemosaic_watch.watch(self.config, progress=self._progress, cancel=self.cancel_event,
                                     on_batch=self.batch_done.emit)
            result = zemosaic_worker.run_mosaic(self.config, progress=self._progress,
                                                cancel=self.cancel_event)
        except zemosaic_worker.Cancelled:
            self.cancelled.emit()
        except zemosaic_worker.PipelineError as exc:
            self.failed.emit("Mosaic failed", str(exc))
        except ConfigError as exc:
            self.failed.emit("Invalid configuration", str(exc))
        except Exception as exc:  # a bug (the error policy): the run stops, its traceback is kept
            logger.error("The run stopped on an unexpected error", exc_info=True)
            self.failed.emit("Unexpected error", f"{type(exc).__name__}: {exc}")
        else:
            self.succeeded.emit(result)


# --------------------------------------------------------------------------------------------------
# The window
# --------------------------------------------------------------------------------------------------


def _error_label() -> QLabel:
    label = QLabel()
    label.setStyleSheet(_ERROR_STYLE)
    label.setWordWrap(True)
    return label


class PreviewView(QScrollArea):
    """The mosaic preview, fitted to the view or at 100 % (one image pixel per screen pixel).

    At 100 % the image scrolls; fitted, it follows the view's size. Without an image the view
    shows a line of text instead.
    """

    def __init__(self, text: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self._image = QPixmap()
        self._fit = True
        self.label = QLabel(text)
        self.label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.label.setStyleSheet("background: #202020; color: #b0b0b0;")
        self.setWidget(self.label)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setStyleSheet("QScrollArea { background: #202020; }")
        self.setMinimumSize(320, 150)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Ignored)
        self._render()

    @property
    def fit(self) -> bool:
        """True when the image is scaled to the view, False at 100 %."""
        return self._fit

    def has_image(self) -> bool:
        """True when an image is shown (rather than a message)."""
        return not self._image.isNull()

    def image(self) -> QPixmap:
        """Return the image shown, at its own size (null while a message is shown)."""
        return self._image

    def set_image(self, image: QPixmap) -> None:
        """Show ``image`` at the current zoom."""
        self._image = image
        self._render()

    def show_message(self, text: str) -> None:
        """Drop the image and show ``text`` instead."""
        self._image = QPixmap()
        self.label.setPixmap(QPixmap())
        self.label.setText(text)
        self._render()

    def set_fit(self, fit: bool) -> None:
        """Scale the image to the view (True) or show it at 100 % (False)."""
        self._fit = fit
        self._render()

    def _render(self) -> None:
        # Fitted, the label fills the viewport and scroll bars would only steal room from it.
        fitted = self._fit or self._image.isNull()
        policy = (Qt.ScrollBarPolicy.ScrollBarAlwaysOff if fitted
                  else Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setHorizontalScrollBarPolicy(policy)
        self.setVerticalScrollBarPolicy(policy)
        self.setWidgetResizable(fitted)
        if self._image.isNull():
            return
        if fitted:
            self.label.setPixmap(self._image.scaled(
                self.viewport().size(), Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation))
        else:
            self.label.setPixmap(self._image)
            self.label.adjustSize()

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().resizeEvent(event)
        if self._fit:
            self._render()


class MainWindow(QMainWindow):
    """The ZeMosaic window. ``config`` (default: the remembered one) fills the widgets."""

    def __init__(self, config: MosaicConfig | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("ZeMosaic")
        self._base_config = MosaicConfig()
        self._thread: _RunThread | None = None
        self._phase = ""
        self._phase_t0 = 0.0
        self._unknown_keys: dict = {}  # entries of a loaded file this program does not use
        self._run_log = None  # the run's log file handler while a run goes on
        self._live_batches = 0  # mosaics made by the live run in progress
        self._output_folder = ""
        self._log_handler = QtLogHandler(parent=self)
        self._log_records: list[tuple[int, str]] = []  # what the panel may show, newest last
        self._saved_levels = {name: logging.getLogger(name).level for name in PIPELINE_LOGGERS}
        self._build_ui()
        self._install_log_handler()
        if config is None:
            config, self._unknown_keys = load_last_config() or (MosaicConfig(), {})
        self.apply_config(config)
        self._restore_geometry()

    # ---- construction -------------------------------------------------------------------------

    def _build_ui(self) -> None:
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.addWidget(self._build_folders())
        middle = QHBoxLayout()
        middle.addLayout(self._build_options(), stretch=3)
        middle.addWidget(self._build_result(), stretch=2)
        top_layout.addLayout(middle, stretch=1)
        top_layout.addLayout(self._build_run_row())
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self._build_log_panel())
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(False)
        self.splitter = splitter
        self.setCentralWidget(splitter)

    def _restore_geometry(self) -> None:
        """Take the size and splitter position the window had when last closed, else a size that
        fits the screen (a 1366x768 laptop included) with the log given :data:`LOG_LINES` lines."""
        settings = _window_settings()
        geometry, state = settings.value("geometry"), settings.value("splitter")
        if isinstance(geometry, QByteArray) and self.restoreGeometry(geometry):
            if isinstance(state, QByteArray):
                self.splitter.restoreState(state)
            return
        screen = self.screen().availableGeometry() if self.screen() is not None else None
        width, height = DEFAULT_SIZE
        if screen is not None:
            # The frame (title bar, borders) is not part of the size: leave room for it.
            width, height = min(width, screen.width() - 16), min(height, screen.height() - 40)
        self.resize(max(width, self.minimumSizeHint().width()), max(height, self.minimumSizeHint().height()))
        log_height = self.log_view.fontMetrics().lineSpacing() * LOG_LINES + LOG_PANEL_CHROME_PX
        top = max(self.splitter.widget(0).minimumSizeHint().height(), self.height() - log_height)
        self.splitter.setSizes([top, max(self.height() - top, log_height)])

    def _save_geometry(self) -> None:
        settings = _window_settings()
        settings.setValue("geometry", self.saveGeometry())
        settings.setValue("splitter", self.splitter.saveState())
        settings.sync()

    def _folder_row(self, grid: QGridLayout, row: int, title: str) -> tuple[QLineEdit, QLabel]:
        edit = QLineEdit()
        browse = QPushButton("Browse…")
        message = _error_label()
        grid.addWidget(QLabel(title), row, 0)
        grid.addWidget(edit, row, 1)
        grid.addWidget(browse, row, 2)
        grid.addWidget(message, row, 3)
        browse.clicked.connect(lambda: self._browse_folder(edit, title))
        edit.textChanged.connect(self._update_start_state)
        return edit, message

    def _build_folders(self) -> QGroupBox:
        box = QGroupBox("Folders")
        grid = QGridLayout(box)
        self.input_edit, self.input_message = self._folder_row(grid, 0, "Input folder")
        self.output_edit, self.output_message = self._folder_row(grid, 1, "Output folder")
        self.input_edit.setToolTip(FIELD_HELP["input_folder"])
        self.output_edit.setToolTip(FIELD_HELP["output_folder"])
        grid.setColumnStretch(1, 3)
        grid.setColumnStretch(3, 2)
        self.folders_box = box
        return box

    def _build_options(self) -> QVBoxLayout:
        self.option_widgets: dict[tuple[str, int | None], QWidget] = {}
        self.option_labels: dict[tuple[str, int | None], QLabel] = {}
        forms = {}
        for name in OPTION_GROUPS:
            box = QGroupBox(name)
            forms[name] = (box, QFormLayout(box))
        for spec in OPTION_SPECS:
            widget = _make_option_widget(spec)
            label = QLabel(spec.label)
            label.setToolTip(FIELD_HELP[spec.field])
            forms[spec.group][1].addRow(label, widget)
            _connect_changed(widget, self._update_start_state)
            _connect_changed(widget, self._update_dependent_options)
            self.option_widgets[spec.key] = widget
            self.option_labels[spec.key] = label
        self._explain_gpu()
        columns = QHBoxLayout()
        left = QVBoxLayout()
        left.addWidget(forms["Stacking"][0])
        left.addWidget(forms["Output"][0])
        left.addStretch(1)
        columns.addLayout(left)
        right = QVBoxLayout()
        right.addWidget(forms["Plate solving"][0])
        right.addWidget(forms["Mosaic"][0])
        right.addWidget(forms["Assembly"][0])
        right.addStretch(1)
        columns.addLayout(right)
        self.options_boxes = [box for box, _form in forms.values()]
        # The options scroll: the window's height must not be the sum of every option's row.
        holder = QWidget()
        holder.setLayout(columns)
        scroll = QScrollArea()
        scroll.setWidget(holder)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setMinimumWidth(holder.sizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
        self.options_scroll = scroll
        layout = QVBoxLayout()
        layout.addWidget(scroll, stretch=1)
        layout.addLayout(self._build_config_buttons())
        return layout

    def _update_dependent_options(self, *_args) -> None:
        """Grey out the options the current switches make unused (see ``OptionSpec.enabled_if``)."""
        for spec in OPTION_SPECS:
            if spec.enabled_if is None:
                continue
            switch, values = spec.enabled_if
            enabled = _widget_value(self.option_widgets[(switch, None)]) in values
            self.option_widgets[spec.key].setEnabled(enabled)
            self.option_labels[spec.key].setEnabled(enabled)

    def _explain_gpu(self) -> None:
        """Disable the GPU switch, with the reason as its tooltip, when no GPU can be used."""
        reason = gpu_unavailable_reason()
        if reason is not None:
            widget = self.option_widgets[("use_gpu_phase5", None)]
            widget.setEnabled(False)
            widget.setToolTip(f"{FIELD_HELP['use_gpu_phase5']}\nGPU not available: {reason}")

    def _build_config_buttons(self) -> QHBoxLayout:
        self.load_button = QPushButton("Load settings…")
        self.save_button = QPushButton("Save settings…")
        self.load_button.setToolTip("Read a JSON configuration file (the one the command line takes).")
        self.save_button.setToolTip("Write these settings as a JSON configuration file.")
        self.load_button.clicked.connect(self._ask_load_config)
        self.save_button.clicked.connect(self._ask_save_config)
        row = QHBoxLayout()
        row.addWidget(self.load_button)
        row.addWidget(self.save_button)
        row.addStretch(1)
        return row

    def _build_result(self) -> QGroupBox:
        box = QGroupBox("Result")
        layout = QVBoxLayout(box)
        self.preview_view = PreviewView("The mosaic preview appears here after a run.")
        self.preview_label = self.preview_view.label
        self.preview_caption = QLabel()
        self.preview_caption.setWordWrap(True)
        self.output_path_label = QLabel()
        self.output_path_label.setWordWrap(True)
        self.output_path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_folder_button = QPushButton("Open output folder")
        self.open_folder_button.setEnabled(False)
        self.open_folder_button.clicked.connect(self._open_output_folder)
        # The paths and summary scroll in a box of their own: their lines must not claim height
        # from the preview (or, on a small screen, from the log).
        details = QWidget()
        details_layout = QVBoxLayout(details)
        details_layout.setContentsMargins(0, 0, 0, 0)
        details_layout.addWidget(self.output_path_label)
        details_layout.addWidget(self.summary_label)
        details_layout.addStretch(1)
        details_scroll = QScrollArea()
        details_scroll.setWidgetResizable(True)
        details_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        details_scroll.setWidget(details)
        details_scroll.setMinimumHeight(3 * self.fontMetrics().lineSpacing())
        layout.addWidget(self.preview_view, stretch=3)
        layout.addLayout(self._build_zoom_row())
        layout.addWidget(details_scroll, stretch=2)
        layout.addWidget(self.open_folder_button, alignment=Qt.AlignmentFlag.AlignLeft)
        return box

    def _build_zoom_row(self) -> QHBoxLayout:
        self.zoom_fit_button = QPushButton("Fit")
        self.zoom_actual_button = QPushButton("100 %")
        self.zoom_fit_button.setToolTip("Show the whole preview in the view.")
        self.zoom_actual_button.setToolTip("One preview pixel per screen pixel (scroll to move).")
        group = QButtonGroup(self)
        for button in (self.zoom_fit_button, self.zoom_actual_button):
            button.setCheckable(True)
            group.addButton(button)
        self.zoom_fit_button.setChecked(True)
        self.zoom_fit_button.toggled.connect(self.preview_view.set_fit)
        row = QHBoxLayout()
        row.addWidget(self.zoom_fit_button)
        row.addWidget(self.zoom_actual_button)
        row.addWidget(self.preview_caption, stretch=1)
        return row

    def _build_run_row(self) -> QVBoxLayout:
        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.live_check = QCheckBox("Live")
        self.live_check.setToolTip("Keep watching the input folder: the mosaic is made again after "
                                   "each batch of new frames (watch_batch_frames, watch_batch_seconds); "
                                   "Cancel ends it, keeping the last mosaic.")
        self.start_button.clicked.connect(self.start_run)
        self.cancel_button.clicked.connect(self.cancel_run)
        self.start_message = _error_label()
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("")
        self.progress_bar.setValue(0)
        self.phase_label = QLabel()
        self.eta_label = QLabel()
        self.status_label = QLabel("Ready")
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.live_check)
        buttons.addWidget(self.start_message, stretch=1)
        progress = QHBoxLayout()
        progress.addWidget(self.progress_bar, stretch=2)
        progress.addWidget(self.eta_label)
        progress.addWidget(self.status_label, stretch=1)
        column = QVBoxLayout()
        column.addLayout(buttons)
        column.addLayout(progress)
        column.addWidget(self.phase_label)
        return column

    def _build_log_panel(self) -> QGroupBox:
        box = QGroupBox("Log")
        layout = QVBoxLayout(box)
        self.log_level_combo = QComboBox()
        self.log_level_combo.addItems(list(LOG_LEVELS))
        self.log_level_combo.setToolTip(FIELD_HELP["logging_level"])
        self.log_level_combo.currentTextChanged.connect(self.set_log_level)
        self.clear_log_button = QPushButton("Clear")
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.clear_log_button.clicked.connect(self._clear_log)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Level"))
        controls.addWidget(self.log_level_combo)
        controls.addWidget(self.clear_log_button)
        controls.addStretch(1)
        layout.addLayout(controls)
        layout.addWidget(self.log_view)
        return box

    # ---- logging ------------------------------------------------------------------------------

    def _install_log_handler(self) -> None:
        self._log_handler.bridge.record.connect(self._append_log)
        logging.getLogger().addHandler(self._log_handler)

    def _remove_log_handler(self) -> None:
        root = logging.getLogger()
        if self._log_handler not in root.handlers:
            return  # already removed: a closed window may be closed again
        root.removeHandler(self._log_handler)
        self._log_handler.bridge.record.disconnect(self._append_log)
        for name, level in self._saved_levels.items():
            logging.getLogger(name).setLevel(level)

    def _append_log(self, text: str, levelno: int) -> None:
        self._log_records.append((levelno, text))
        del self._log_records[:-LOG_KEPT_RECORDS]
        if levelno >= self._log_handler.level:
            self.log_view.appendPlainText(text)

    def _clear_log(self) -> None:
        self._log_records.clear()
        self.log_view.clear()

    def _refilter_log(self) -> None:
        """Show again the records kept so far that pass the current level (a lower level brings
        back what a higher one hid, down to what the loggers emitted)."""
        shown = [text for levelno, text in self._log_records if levelno >= self._log_handler.level]
        self.log_view.setPlainText("\n".join(shown))
        self.log_view.moveCursor(self.log_view.textCursor().MoveOperation.End)

    @property
    def log_handler(self) -> QtLogHandler:
        """The one handler this window adds to the root logger."""
        return self._log_handler

    def set_log_level(self, level: str) -> None:
        """Show records at or above ``level``: sets the pipeline loggers' and the handler's level,
        and filters what the panel already shows the same way."""
        self._log_handler.setLevel(level)
        for name in PIPELINE_LOGGERS:
            logging.getLogger(name).setLevel(level)
        self._refilter_log()
        if self.log_level_combo.currentText() != level:
            self.log_level_combo.setCurrentText(level)

    # ---- configuration ------------------------------------------------------------------------

    def apply_config(self, config: MosaicConfig) -> None:
        """Show ``config`` in the widgets (fields without a widget are kept as they are)."""
        self._base_config = config
        self.input_edit.setText(config.input_folder)
        self.output_edit.setText(config.output_folder)
        for spec in OPTION_SPECS:
            value = getattr(config, spec.field)
            _set_widget_value(self.option_widgets[spec.key],
                              value if spec.part is None else value[spec.part])
        self.set_log_level(config.logging_level)
        self._update_dependent_options()
        self._update_start_state()

    def config_from_widgets(self) -> MosaicConfig:
        """Return the validated configuration the widgets describe; raises :class:`ConfigError`."""
        values = {"input_folder": os.path.expanduser(self.input_edit.text().strip()),
                  "output_folder": os.path.expanduser(self.output_edit.text().strip()),
                  "logging_level": self.log_level_combo.currentText()}
        pairs: dict[str, list] = {}
        for spec in OPTION_SPECS:
            value = _widget_value(self.option_widgets[spec.key])
            if spec.part is None:
                values[spec.field] = value
            else:
                pair = pairs.setdefault(spec.field, list(getattr(self._base_config, spec.field)))
                pair[spec.part] = value
        values.update({name: tuple(pair) for name, pair in pairs.items()})
        return self._base_config.replace(**values)

    def save_config_to(self, path: str) -> bool:
        """Write the widgets' configuration to ``path``; returns False (user told) on failure."""
        try:
            save_config(self.config_from_widgets(), path, self._unknown_keys)
        except ConfigError as exc:
            self._show_error("Cannot save settings", _config_error_text(exc))
            return False
        except OSError as exc:
            self._show_error("Cannot save settings", f"{path}: {exc.strerror or exc}")
            return False
        logger.info("Settings saved to %s", path)
        return True

    def load_config_from(self, path: str) -> bool:
        """Read ``path`` into the widgets; returns False (user told which key) on failure.

        The file's keys this program does not use (upstream ZeMosaic's, for instance) are kept
        and written back by the next Save.
        """
        try:
            config, unknown = read_config_file(path)
        except ConfigError as exc:
            self._show_error("Cannot load settings", _config_error_text(exc))
            return False
        self._unknown_keys = unknown
        self.apply_config(config)
        logger.info("Settings loaded from %s", path)
        return True

    def _ask_load_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load settings", config_dir(),
                                              "JSON configuration (*.json);;All files (*)")
        if path:
            self.load_config_from(path)

    def _ask_save_config(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save settings", config_dir(),
                                              "JSON configuration (*.json)")
        if path:
            self.save_config_to(path)

    def _browse_folder(self, edit: QLineEdit, title: str) -> None:
        start = edit.text().strip() or os.path.expanduser("~")
        folder = QFileDialog.getExistingDirectory(self, title, start)
        if folder:
            edit.setText(folder)

    # ---- state --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a run is in progress."""
        return self._thread is not None

    def _update_start_state(self, *_args) -> None:
        """Validate folders and options as they are edited; Start only when both are fine."""
        input_problem = input_folder_problem(self.input_edit.text())
        output_problem = output_folder_problem(self.output_edit.text())
        self.input_message.setText(input_problem or "")
        self.output_message.setText(output_problem or "")
        config_problem = None
        try:
            zemosaic_worker.check_solver_paths(self.config_from_widgets())
        except ConfigError as exc:
            config_problem = _config_error_text(exc)
        self.start_message.setText(config_problem or "")
        ok = input_problem is None and output_problem is None and config_problem is None
        self.start_button.setEnabled(ok and not self.running)

    def _set_running(self, running: bool) -> None:
        for widget in [self.folders_box, self.load_button, self.live_check, *self.options_boxes]:
            widget.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self._update_start_state()

    # ---- the run ------------------------------------------------------------------------------

    def start_run(self) -> None:
        """Validate the widgets and start the pipeline on a worker thread."""
        if self.running:
            return
        try:
            config = self.config_from_widgets()
        except ConfigError as exc:
            self.start_message.setText(_config_error_text(exc))
            return
        save_last_config(config, self._unknown_keys)
        self._reset_result()
        thread = _RunThread(config, self, live=self.live_check.isChecked())
        thread.progressed.connect(self._on_progress)
        thread.succeeded.connect(self._on_succeeded)
        thread.batch_done.connect(self._on_batch)
        self._live_batches = 0
        thread.failed.connect(self._on_failed)
        thread.cancelled.connect(self._on_cancelled)
        thread.finished.connect(self._on_thread_finished)
        self._thread = thread
        self._output_folder = config.output_folder
        self.status_label.setText("Running…")
        self._set_running(True)
        self._run_log = zemosaic_cli.attach_run_log(config)
        logger.info("Run started: %s -> %s", config.input_folder, config.output_folder)
        thread.start()

    def cancel_run(self) -> None:
        """Ask the running pipeline to stop at its next frame or tile."""
        if self._thread is None:
            return
        self._thread.cancel_event.set()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling…")

    def _reset_result(self) -> None:
        # The last good preview stays until a new one replaces it (a failed or cancelled run
        # leaves it); the path and summary go, as the new run may remove that run's files.
        if self.preview_view.has_image():
            self.preview_caption.setText("Previous result; running…")
        else:
            self.preview_view.show_message("Running…")
        self.output_path_label.clear()
        self.summary_label.clear()
        self.open_folder_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("")
        self.phase_label.clear()
        self.eta_label.clear()
        self._phase = ""

    def _on_progress(self, phase: str, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self._phase, self._phase_t0 = phase, now
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(min(done, max(total, 1)))
        self.progress_bar.setFormat(f"{phase_title(phase)}  {done}/{total}")
        number = zemosaic_worker.PHASES.index(phase) + 1 if phase in zemosaic_worker.PHASES else 0
        self.phase_label.setText(f"Phase {number}/{len(zemosaic_worker.PHASES)}: "
                                 f"{phase_title(phase)} — {message}")
        self.eta_label.setText(zemosaic_cli.format_eta(
            zemosaic_cli.estimate_eta(now - self._phase_t0, done, total)))

    def _show_result(self, result) -> None:
        self.preview_caption.clear()
        self._show_preview(result.paths["preview"])
        self.output_path_label.setText(f"Mosaic: {result.paths['mosaic']}")
        self.summary_label.setText(zemosaic_cli.format_summary(result, brief=True))
        self.open_folder_button.setEnabled(True)
        logger.info("%s", zemosaic_cli.format_summary(result))

    def _on_succeeded(self, result) -> None:
        self._show_result(result)
        self.status_label.setText(f"Done in {result.elapsed_s:.1f} s")
        self._finish_progress("Finished")

    def _on_batch(self, result) -> None:
        self._live_batches += 1
        self._show_result(result)
        self.status_label.setText(f"Live: mosaic {self._live_batches} made; watching")
        self._finish_progress("Waiting for new frames")

    def _on_failed(self, title: str, message: str) -> None:
        self.status_label.setText("Failed")
        self._keep_last_preview("The run failed", "No mosaic: the run failed.")
        self._finish_progress("Failed")
        logger.error("%s: %s", title, message)
        self._show_error(title, message)

    def _on_cancelled(self) -> None:
        if self._live_batches:  # live mode ends with a cancel: its last mosaic is the result
            self.status_label.setText(f"Live mode stopped after {self._live_batches} mosaic(s)")
            self._finish_progress("Stopped")
            logger.info("Live mode stopped; the last mosaic stays in the output folder")
            return
        self.status_label.setText("Cancelled")
        self._keep_last_preview("Cancelled", "Cancelled: no mosaic written.")
        self._finish_progress("Cancelled")
        logger.info("Run cancelled; no mosaic written")

    def _finish_progress(self, text: str) -> None:
        self.progress_bar.setFormat(text)
        self.eta_label.clear()

    def _on_thread_finished(self) -> None:
        zemosaic_cli.detach_run_log(self._run_log)
        self._run_log = None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.deleteLater()
        self._set_running(False)

    # ---- result display -----------------------------------------------------------------------

    def _show_preview(self, path: str) -> None:
        image = QPixmap(path)
        if image.isNull():
            self.preview_view.show_message(f"Cannot show the preview {path}")
            return
        self.preview_view.set_image(image)

    def _keep_last_preview(self, what: str, no_preview_text: str) -> None:
        """After a run without a mosaic: say so under the last good preview, or in its place."""
        if self.preview_view.has_image():
            self.preview_caption.setText(f"{what}; showing the previous result.")
        else:
            self.preview_view.show_message(no_preview_text)

    def _open_output_folder(self) -> None:
        if self._output_folder:
            QDesktopServices.openUrl(QUrl.fromLocalFile(os.path.abspath(self._output_folder)))

    def _show_error(self, title: str, text: str) -> None:
        """Tell the user about a failure (tests replace this to avoid a modal box)."""
        QMessageBox.critical(self, title, text)

    # ---- closing ------------------------------------------------------------------------------

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        """Stop a run (cancel and wait), remember the settings, detach the log handler."""
        if self._thread is not None:
            self.cancel_run()
            # The worker checks the Event between frames and tiles, so this wait is short;
            # a QThread must not be destroyed while it runs.
            self._thread.wait()
        try:
            save_last_config(self.config_from_widgets(), self._unknown_keys)
        except ConfigError as exc:
            logger.warning("Settings not remembered: %s", exc)
        self._save_geometry()
        self._remove_log_handler()
        super().closeEvent(event)


def _window_settings() -> QSettings:
    """Return where the window's size and splitter position are kept (beside the remembered
    configuration, :func:`config_dir`)."""
    return QSettings(os.path.join(config_dir(), "window.ini"), QSettings.Format.IniFormat)


def _config_error_text(exc: ConfigError) -> str:
    """Return a readable message for a configuration error, naming the setting when known."""
    if exc.key:
        return f"Setting '{exc.key}' is not valid: {exc}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Open the ZeMosaic window (``zemosaic [CONFIG.json]``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="zemosaic", description="ZeMosaic mosaic builder window.")
    parser.add_argument("config", nargs="?", help="JSON configuration to load at start")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("ZeMosaic")
    window = MainWindow()
    window.show()
    if args.config:
        window.load_config_from(args.config)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
