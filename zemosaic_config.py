"""Validated run configuration for ZeMosaic.

A run is described by one immutable :class:`MosaicConfig`.  It can be built
directly (``MosaicConfig(stacking_kappa_low=2.5)``), from a JSON-like dict
(:func:`config_from_dict`) or from a JSON file (:func:`load_config`).  Every
route goes through the same validation, so a ``MosaicConfig`` that exists is
always valid.  Changed copies are made with :meth:`MosaicConfig.replace`,
which validates too.

Each field carries its plain-words description, its allowed values and the
text of its rule in the dataclass field metadata; :data:`FIELD_HELP`,
:data:`CHOICES` and :data:`FIELD_EXPECTED` expose that single table so a GUI
can build tooltips and drop-downs without duplicating it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import numbers
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from zemosaic_files import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "CHOICES",
    "FIELD_EXPECTED",
    "FIELD_HELP",
    "ConfigError",
    "MosaicConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_file",
    "save_config",
    "split_config_dict",
]


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used.

    ``key`` and ``value`` are set when the error concerns one field, so a GUI
    can highlight it; the message always names them in plain words.
    """

    def __init__(self, message: str, key: str | None = None, value: Any = None):
        super().__init__(message)
        self.key = key
        self.value = value


class _Reject(Exception):
    """Internal: a checker refuses a value (the field's rule text is reported)."""


# --------------------------------------------------------------------------
# Value checkers: each returns the normalised value or raises _Reject.
# --------------------------------------------------------------------------


def _is_bool(value: Any) -> bool:
    # NumPy booleans (np.True_) are not Python bools but mean the same thing.
    kind = type(value)
    numpy_bool = kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    return isinstance(value, bool) or numpy_bool


def _is_number(value: Any) -> bool:
    # bool is a subclass of int, but True as a kappa is always a mistake.
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _as_float(value: Any) -> float:
    if _is_bool(value):
        raise _Reject("true/false is not a number")
    if isinstance(value, str):
        raise _Reject("got text; write the number without quotes")
    if not _is_number(value):
        raise _Reject(f"got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise _Reject()
    return result


def _check_path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _Reject()
    return value


def _check_choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Reject()
        candidate = value.strip().upper() if upper else value
        if candidate not in choices:
            raise _Reject()
        return candidate

    return check


def _check_float(minimum: float, inclusive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        result = _as_float(value)
        if result < minimum or (not inclusive and result == minimum):
            raise _Reject()
        return result

    return check


def _check_fraction(zero_allowed: bool) -> Callable[[Any], float]:
    """Return a check of a number up to 1, above 0 (or from 0 with ``zero_allowed``)."""
    def check(value: Any) -> float:
        result = _as_float(value)
        if not (0.0 <= result if zero_allowed else 0.0 < result) or result > 1.0:
            raise _Reject()
        return result

    return check


def _as_int(value: Any) -> int:
    # An integral float (2.0) is accepted because JSON writers sometimes emit it.
    result = _as_float(value)
    if result != int(result):
        raise _Reject()
    return int(result)


def _check_int_min(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        result = _as_int(value)
        if result < minimum:
            raise _Reject()
        return result

    return check


def _check_int_choice(choices: tuple[int, ...]) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        result = _as_int(value)
        if result not in choices:
            raise _Reject()
        return result

    return check


def _check_raw_cap(value: Any) -> int:
    # A cap of 1 would make every master tile a single frame: nothing to stack.
    result = _as_int(value)
    if result != 0 and result < 2:
        raise _Reject()
    return result


def _check_bool(value: Any) -> bool:
    # 0/1 or "true" are refused: a typo in a JSON file should not flip a switch.
    if _is_bool(value):
        return bool(value)
    raise _Reject()


def _check_workers(value: Any) -> int:
    # Upstream ZeMosaic writes -1 for "automatic", which 0 means here.
    result = _as_int(value)
    if result < -1:
        raise _Reject()
    return max(result, 0)


# Scheduler addresses dask.distributed accepts: protocol://host:port, or host:port (TCP).
_SCHEDULER_RE = re.compile(r"^((tcp|tls|inproc|ucx|ws|wss)://\S+|[\w.\-\[\]:]+:\d+)$")


def _check_scheduler(value: Any) -> str:
    # Empty: no cluster; "local": a LocalCluster on this machine; otherwise an address.
    if not isinstance(value, str):
        raise _Reject()
    text = value.strip()
    if text and text != "local" and not _SCHEDULER_RE.match(text):
        raise _Reject()
    return text


def _as_pair(value: Any) -> tuple[float, float]:
    # Upstream ZeMosaic stores pairs as the string "0.05,0.05".
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            items: list[Any] = [float(p) for p in parts]
        except ValueError:
            raise _Reject() from None
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Reject()
    if len(items) != 2:
        raise _Reject()
    return _as_float(items[0]), _as_float(items[1])


def _check_winsor(value: Any) -> tuple[float, float]:
    low, high = _as_pair(value)
    if not (0.0 <= low < 0.5 and 0.0 <= high < 0.5):
        raise _Reject()
    return low, high


def _check_gain_clip(value: Any) -> tuple[float, float]:
    low, high = _as_pair(value)
    if not (0.0 < low <= 1.0 <= high):
        raise _Reject()
    return low, high


# --------------------------------------------------------------------------
# The field table.
# --------------------------------------------------------------------------

# The vocabularies of the choice settings; the stacking code checks its arguments against them.
NORMALIZE_METHODS = ("linear_fit", "sky_mean", "none")
WEIGHTING_METHODS = ("noise_variance", "none")
REJECTION_ALGORITHMS = ("winsorized_sigma_clip", "kappa_sigma", "none")
COMBINE_METHODS = ("mean", "median")
ALIGN_METHODS = ("astroalign", "wcs")
CFA_METHODS = ("debayer", "bayer_drizzle")
DRIZZLE_SCALES = (1, 2)
#: Kernels of the ``drizzle`` package offered (zemosaic_drizzle): square (the classic drop),
#: point (into the output pixel under the sample's centre), gaussian (a Gaussian of the drop's size).
DRIZZLE_KERNELS = ("square", "point", "gaussian")
ASSEMBLY_ENGINES = ("fast", "reproject")
FINAL_GRIDS = ("north_up", "rotated")
BACKGROUND_ORDERS = (0, 1, 2)
FINAL_BACKGROUND_ORDERS = (1, 2)
_LOG_LEVELS = ("ERROR", "WARNING", "INFO", "DEBUG")
_RESUME = ("auto", "off")


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``name``, ``value`` and the allowed ``choices`` when ``value`` is not one."""
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not allowed: expected {_one_of(choices)}")


def _spec(default: Any, help_text: str, expected: str,
          check: Callable[[Any], Any], choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose metadata holds its help, rule and checker."""
    meta = {"help": help_text, "expected": expected, "check": check, "choices": choices}
    return field(default=default, metadata=meta)


def _bool_spec(default: bool, help_text: str) -> Any:
    return _spec(default, help_text, "true or false", _check_bool)


def _number_spec(default: float, help_text: str, zero_allowed: bool = False) -> Any:
    expected = "a number >= 0" if zero_allowed else "a number > 0"
    return _spec(default, help_text, expected, _check_float(0.0, inclusive=zero_allowed))


def _choice_spec(default: str, help_text: str, choices: tuple[str, ...],
                 upper: bool = False) -> Any:
    expected = _one_of(choices) + (" (case-insensitive)" if upper else "")
    return _spec(default, help_text, expected, _check_choice(choices, upper), choices)


@dataclass(frozen=True)
class MosaicConfig:
    """All settings of one mosaic run (immutable, always valid).

    Construction validates and normalises every field (lists become tuples,
    ``"0.05,0.05"`` becomes ``(0.05, 0.05)``, log levels are upper-cased) and
    raises :class:`ConfigError` on the first bad value.
    """

    input_folder: str = _spec(
        "", "Folder holding the input frames (raw subs; plate-solved here when needed).", "a folder path (text)",
        _check_path)
    output_folder: str = _spec(
        "", "Folder where the mosaic and its preview are written.",
        "a folder path (text)", _check_path)
    stacking_normalize_method: str = _choice_spec(
        "linear_fit", "How frames are brought to a common brightness before stacking.",
        NORMALIZE_METHODS)
    stacking_weighting_method: str = _choice_spec(
        "noise_variance", "How much each frame counts in the stack (less noise, more weight).",
        WEIGHTING_METHODS)
    stacking_rejection_algorithm: str = _choice_spec(
        "winsorized_sigma_clip", "How outlier pixels (satellites, hot pixels) are rejected.",
        REJECTION_ALGORITHMS)
    stacking_kappa_low: float = _number_spec(
        3.0, "Reject pixels darker than this many standard deviations below the stack.")
    stacking_kappa_high: float = _number_spec(
        3.0, "Reject pixels brighter than this many standard deviations above the stack.")
    stacking_winsor_limits: tuple[float, float] = _spec(
        (0.05, 0.05), "Fractions of lowest and highest values clamped before measuring spread.",
        "two numbers, each >= 0 and < 0.5 (a list or the text 'low,high')", _check_winsor)
    stacking_final_combine_method: str = _choice_spec(
        "mean", "How the kept pixel values of a stack are combined.", COMBINE_METHODS)
    stacking_kappa_max_iterations: int = _spec(
        5, "Maximum rounds of outlier rejection.", "an integer >= 1", _check_int_min(1))
    align_method: str = _choice_spec(
        "astroalign", "How frames are aligned: star matching or the plate solution only.",
        ALIGN_METHODS)
    stacking_cfa_method: str = _choice_spec(
        "debayer", "How a raw colour frame's samples reach the tile: debayered (bilinear) then "
        "resampled, or Bayer drizzle (each sample dropped onto the tile grid into its own colour, "
        "nothing interpolated between colours).", CFA_METHODS)
    drizzle_scale: int = _spec(
        1, "Bayer drizzle: tile pixels per frame pixel on a side (2: a grid twice as fine, four "
        "times the pixels).", "1 or 2", _check_int_choice(DRIZZLE_SCALES))
    drizzle_pixfrac: float = _spec(
        0.0, "Bayer drizzle: size of each sample's drop as a fraction of its pixel (0 = 1.0 at "
        "scale 1, 0.7 at scale 2; a drop larger than its pixel only blurs).", "a number from 0 to 1",
        _check_fraction(zero_allowed=True))
    drizzle_kernel: str = _choice_spec(
        "square", "Bayer drizzle: the shape of each drop.", DRIZZLE_KERNELS)
    correct_hot_pixels: bool = _bool_spec(
        True, "Replace isolated hot pixels in raw colour frames before debayering.")
    saturation_level: float = _number_spec(
        0.0, "Raw level (ADU) at and above which a pixel is saturated; its stars are shown white "
        "(0 = the frame's DATAMAX or SATURATE card, else 99 % of its integer range: 64880 for "
        "a Seestar sub).", zero_allowed=True)
    frame_screening: bool = _bool_spec(
        True, "Leave out frames far worse than the rest of their group (cloud, defocus, wind, "
        "bright sky), each with its reason in the run report.")
    screen_min_star_fraction: float = _spec(
        0.5, "Leave out a frame whose star count or star brightness is below this fraction of its "
        "group's median (and screen_kappa spreads below it).",
        "a number > 0 and <= 1", _check_fraction(zero_allowed=False))  # 0 would leave nothing out
    screen_max_fwhm_ratio: float = _spec(
        1.5, "Leave out a frame whose star size (FWHM) is above this many times its group's median "
        "(and screen_kappa spreads above it).", "a number >= 1", _check_float(1.0, inclusive=True))
    screen_max_background_ratio: float = _spec(
        1.5, "Leave out a frame whose sky background is above this many times its group's median "
        "(and screen_kappa spreads above it).", "a number >= 1", _check_float(1.0, inclusive=True))
    screen_kappa: float = _number_spec(
        3.0, "How many robust standard deviations of its group a frame must also stray from the "
        "group's median to be left out.")
    force_resolve_existing_wcs: bool = _bool_spec(
        False, "Plate-solve every frame again, even those whose file already holds a WCS.")
    astap_executable_path: str = _spec(
        "", "ASTAP program used for plate solving (empty: astrometry.net's solve-field).",
        "a file path (text), or empty", _check_path)
    astap_data_directory_path: str = _spec(
        "", "Folder of ASTAP's star database (empty: ASTAP's own default).",
        "a folder path (text), or empty", _check_path)
    astap_default_search_radius: float = _number_spec(
        3.0, "How far (degrees) from the telescope's pointing the plate solver searches.")
    plate_solve_timeout_s: float = _number_spec(
        60.0, "Time limit in seconds for plate-solving one frame.")
    cluster_panel_threshold: float = _number_spec(
        0.0, "Distance in degrees that separates mosaic panels (0 = automatic).", zero_allowed=True)
    max_raw_per_master_tile: int = _spec(
        0, "Largest number of frames stacked into one master tile (0 = no cap).",
        "0 (no cap) or an integer >= 2", _check_raw_cap)
    assembly_engine: str = _choice_spec(
        "fast", "How master tiles are reprojected onto the mosaic grid.", ASSEMBLY_ENGINES)
    final_grid: str = _choice_spec(
        "north_up", "Orientation of the mosaic FITS: north up and east left, as the preview and "
        "every viewer show it, or rotated to the smallest canvas around the tiles.", FINAL_GRIDS)
    background_model_order: int = _spec(
        1, "Sky background removed from each frame and each tile so that overlaps agree: a "
        "polynomial of this order solved from the overlaps' differences (0: an offset, 1: a "
        "plane, 2: a curved light dome).", "0, 1 or 2", _check_int_choice(BACKGROUND_ORDERS))
    match_background: bool = _bool_spec(
        True, "Even out sky brightness and gradients between overlapping tiles.")
    assembly_feather_px: float = _number_spec(
        256.0, "Width in pixels over which a tile's weight fades in from its edge, so that what "
        "differs between tiles spreads over their overlap instead of making a step (never wider "
        "than the overlap; 0 = no fading).", zero_allowed=True)
    final_background_extraction: bool = _bool_spec(
        False, "Remove a smooth background from the finished mosaic, fitted on its sky away "
        "from stars and objects, for a flat sky.")
    final_background_order: int = _spec(
        2, "Order of the polynomial the final background extraction fits (1: a plane, 2: a "
        "curved one).", "1 or 2", _check_int_choice(FINAL_BACKGROUND_ORDERS))
    intertile_photometric_match: bool = _bool_spec(
        True, "Even out brightness and colour between overlapping tiles (gains from their stars).")
    use_gpu_phase5: bool = _bool_spec(
        False, "Use the graphics card (CUDA) for the final assembly when available.")
    two_pass_coverage_renorm: bool = _bool_spec(
        False, "Run a second pass that evens out brightness where coverage changes.")
    two_pass_cov_sigma_px: float = _number_spec(
        50.0, "Smoothing radius in pixels of the second-pass brightness correction.", zero_allowed=True)
    two_pass_cov_gain_clip: tuple[float, float] = _spec(
        (0.85, 1.18), "Lowest and highest brightness gain the second pass may apply.",
        "two numbers low, high with 0 < low <= 1 <= high", _check_gain_clip)
    logging_level: str = _choice_spec(
        "INFO", "How much detail the log shows.", _LOG_LEVELS, upper=True)
    save_channel_files: bool = _bool_spec(
        False, "Also write each colour as its own plain FITS (for SWarp and Montage).")
    save_final_as_uint16: bool = _bool_spec(
        False, "Also write a 16-bit integer copy of the mosaic (0 = no data) for viewers "
        "that cannot read floating point or blank pixels.")
    resume: str = _choice_spec(
        "auto", "Reuse the master tiles a crashed or cancelled run already finished "
        "(auto), or rebuild them all (off).", _RESUME)
    num_processing_workers: int = _spec(
        0, "How many master tiles are built at once, each in a process of its own "
        "(0 = one per CPU core; 1 = in the program's own process).",
        "an integer >= 0 (0 = one per CPU core; upstream's -1 means the same)", _check_workers)
    dask_scheduler: str = _spec(
        "", "Build the master tiles on a Dask cluster: the scheduler's address, 'local' for a "
        "cluster on this computer, or empty for none.",
        "empty, 'local', or a Dask scheduler address such as 'tcp://host:8786'", _check_scheduler)
    watch_batch_frames: int = _spec(
        10, "Live mode (--watch, or Live in the window): make the mosaic again once this many new "
        "frames have arrived in the input folder.", "an integer >= 1", _check_int_min(1))
    watch_batch_seconds: float = _number_spec(
        120.0, "Live mode: make the mosaic again this many seconds after the first new frame "
        "arrived, however few came since.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # Frozen dataclass: object.__setattr__ is the sanctioned way to normalise.
            object.__setattr__(self, f.name, _validate_field(f, value))

    def replace(self, **changes: Any) -> "MosaicConfig":
        """Return a validated copy with ``changes`` applied (canonical keys only).

        Raises :class:`ConfigError` for an unknown key or an invalid value.
        """
        unknown = sorted(set(changes) - set(_FIELD_NAMES))
        if unknown:
            raise ConfigError(
                f"unknown configuration key(s): {', '.join(unknown)}; "
                f"allowed keys are the MosaicConfig field names")
        return dataclasses.replace(self, **changes)


def _short_repr(value: Any) -> str:
    """Return ``repr(value)`` cut to a readable length (a value nested 1000 deep stays one line)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlist = 3, 200, 200, 8
    return short.repr(value)


def _validate_field(f: dataclasses.Field, value: Any) -> Any:
    try:
        return f.metadata["check"](value)
    except _Reject as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(
            f"{f.name} = {_short_repr(value)} is not allowed: expected {f.metadata['expected']}{detail}",
            key=f.name, value=value) from None


_FIELDS = dataclasses.fields(MosaicConfig)
_FIELD_NAMES = tuple(f.name for f in _FIELDS)

#: One-line plain-words description of every field (for tooltips).
FIELD_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in _FIELDS}
#: Allowed values of the fields that take a fixed set of words (for drop-downs).
CHOICES: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["choices"] for f in _FIELDS if f.metadata["choices"]}
#: The rule each field's value must follow, in words (used in error messages).
FIELD_EXPECTED: dict[str, str] = {f.name: f.metadata["expected"] for f in _FIELDS}
#: Alternative JSON key -> canonical field name: upstream ZeMosaic's names for the settings that
#: mean the same here (the value is used as it is; the README's key table lists what upstream keys
#: have no equivalent and why).
ALIASES: dict[str, str] = {
    "input_dir": "input_folder",
    "output_dir": "output_folder",
    "use_gpu": "use_gpu_phase5",
    # Upstream's switch for astropy's match_background in the final co-add: per-tile sky offsets
    # solved from the overlaps, as match_background does here.
    "match_background_for_final": "match_background",
}
#: Upstream ZeMosaic's keys that have no equivalent here (the README's table says why): named once
#: at INFO when a file carries them, never an error, whatever known key they resemble.
UPSTREAM_WITHOUT_EQUIVALENT = frozenset({
    "final_assembly_method", "assembly_process_workers", "winsor_worker_limit", "use_gpu_global",
    "stack_use_gpu", "use_gpu_stack", "solver_method", "astrometry_local_path",
    "astrometry_api_key", "auto_limit_frames_per_master_tile", "tile_weight_mode",
    "enable_tile_weighting", "apply_radial_weight", "poststack_equalize_rgb",
})
# The shortest key part that counts as a near match inside a longer key (`kappa_low` in
# `stacking_kappa_low`): shorter ones (`low`, `mode`) are in too many keys to suggest one.
_MIN_PART_MATCH = 5


# --------------------------------------------------------------------------
# dict / JSON conversion
# --------------------------------------------------------------------------


def _apply_aliases(d: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(d)
    for alias, canonical in ALIASES.items():
        if alias not in result:
            continue
        value = result.pop(alias)
        if canonical in result and result[canonical] != value:
            raise ConfigError(
                f"{alias} = {value!r} conflicts with {canonical} = {result[canonical]!r}: "
                f"{alias} is another name for {canonical}; give only one of them",
                key=canonical, value=value)
        result.setdefault(canonical, value)
    return result


def _nearest_key(key: str) -> str | None:
    """Return the known key (field or alias) closest to ``key``, or None when none is close."""
    matches = difflib.get_close_matches(key, (*_FIELD_NAMES, *ALIASES), n=1, cutoff=0.8)
    return matches[0] if matches else None


def _squashed(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _near_keys(key: str) -> list[str]:
    """Return the known keys that ``key`` is a variant of, nearest first (empty: none).

    A variant is one edit away (``stacking_kapa_low``), the same letters without case or
    separators (``StackingKappaLow``), or one key contained in the other at a ``_`` boundary:
    a known key's last or first parts (``kappa_low`` for ``stacking_kappa_low``) or a known key
    with parts added (``use_gpu_phase5_global``), the shorter at least :data:`_MIN_PART_MATCH`
    characters long.
    """
    known = (*_FIELD_NAMES, *ALIASES)
    near = _nearest_key(key)
    if near is not None and _within_one_edit(key, near):
        return [near]
    squashed = _squashed(key)
    found = [k for k in known if _squashed(k) == squashed]
    for k in known:
        short, long_ = sorted((key.lower(), k), key=len)
        if len(short) >= _MIN_PART_MATCH and short != long_ and (
                long_.endswith("_" + short) or long_.startswith(short + "_")):
            found.append(k)
    return sorted(set(found), key=lambda k: (abs(len(k) - len(key)), k))


def _within_one_edit(a: str, b: str) -> bool:
    """True when ``a`` becomes ``b`` by one insertion, deletion, substitution or swap of neighbours."""
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return (a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]
            or a[i:i + 2][::-1] + a[i + 2:] == b[i:])


def split_config_dict(d: Mapping[str, Any]) -> tuple[MosaicConfig, dict[str, Any]]:
    """Return the validated :class:`MosaicConfig` of a JSON-like mapping and its unknown entries.

    Aliases (:data:`ALIASES`) are mapped to canonical keys; an alias and its
    canonical key with different values raise :class:`ConfigError`.  Missing
    keys take their defaults.  A key that is a variant of a known key
    (:func:`_near_keys`: a typo, other case or separators, a part of it or
    more than it) raises :class:`ConfigError` with "did you mean"; upstream
    ZeMosaic's keys without an equivalent (:data:`UPSTREAM_WITHOUT_EQUIVALENT`)
    are named in one INFO line; other unknown keys are ignored with a single
    WARNING that lists them all (sorted), each with the nearest known key.  The unknown entries
    come back as given (in their
    order) so a caller that rewrites the file can keep them.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"configuration must be a JSON object (key: value pairs), got {type(d).__name__}")
    bad_keys = [k for k in d if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"configuration keys must be text, got {bad_keys!r}")
    values = _apply_aliases(d)
    unknown = sorted(k for k in values if k not in _FIELD_NAMES)
    upstream = [k for k in unknown if k in UPSTREAM_WITHOUT_EQUIVALENT]
    others = [k for k in unknown if k not in UPSTREAM_WITHOUT_EQUIVALENT]
    for key in others:
        near = _near_keys(key)
        if near:
            # A variant of a real key would silently run with that key's default: refuse it.
            choices = " or ".join(repr(k) for k in near[:3])
            raise ConfigError(f"unknown configuration key {key!r}: did you mean {choices}?",
                              key=key, value=values[key])
    if upstream:
        logger.info("Ignoring upstream ZeMosaic keys that have no equivalent here: %s",
                    ", ".join(upstream))
    if others:
        hints = [f"{k} (did you mean {_nearest_key(k)}?)" if _nearest_key(k) else k for k in others]
        logger.warning("Ignoring unknown configuration keys: %s", ", ".join(hints))
    config = MosaicConfig(**{k: v for k, v in values.items() if k in _FIELD_NAMES})
    return config, {k: v for k, v in d.items() if k in unknown}


def config_from_dict(d: Mapping[str, Any]) -> MosaicConfig:
    """Build a validated :class:`MosaicConfig` from a JSON-like mapping.

    The rules for aliases, unknown keys and typos are those of :func:`split_config_dict`;
    the unknown entries are dropped.
    """
    return split_config_dict(d)[0]


def config_to_dict(config: MosaicConfig) -> dict[str, Any]:
    """Return the configuration as a JSON-able dict with canonical keys (tuples as lists)."""
    result: dict[str, Any] = {}
    for name in _FIELD_NAMES:
        value = getattr(config, name)
        result[name] = list(value) if isinstance(value, tuple) else value
    return result


def read_config_file(path: str | os.PathLike) -> tuple[MosaicConfig, dict[str, Any]]:
    """Read and validate a JSON configuration file; returns the config and its unknown entries.

    Raises :class:`ConfigError` naming the file when it cannot be read, is not
    valid JSON (with line and column), is not a JSON object or holds a bad value.
    The unknown entries (upstream keys with no equivalent, for instance) are
    those of :func:`split_config_dict`.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read configuration file {path}: {reason}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"configuration file {path} is not valid JSON: {exc.msg} "
            f"at line {exc.lineno}, column {exc.colno}") from exc
    except RecursionError:
        raise ConfigError(f"configuration file {path} is nested too deeply to be a "
                          "configuration (lists or objects inside each other)") from None
    try:
        return split_config_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", key=exc.key, value=exc.value) from exc
    except RecursionError:
        raise ConfigError(f"configuration file {path} holds a value nested too deeply") from None


def load_config(path: str | os.PathLike) -> MosaicConfig:
    """Read and validate a JSON configuration file (see :func:`read_config_file`).

    Unknown keys are reported once and dropped.
    """
    return read_config_file(path)[0]


def save_config(config: MosaicConfig, path: str | os.PathLike,
                unknown: Mapping[str, Any] | None = None) -> None:
    """Write ``config`` as indented JSON with canonical keys, atomically.

    ``unknown`` holds entries this program does not use (those
    :func:`read_config_file` returned): they are written untouched after the
    known keys, so a file shared with upstream ZeMosaic keeps its other
    settings.  An entry named like a field or an alias raises ``ValueError``:
    it would contradict the field on the next load.

    The text goes to a hidden temporary file in the destination folder which
    then replaces ``path`` in one step (:func:`zemosaic_files.write_text_atomic`),
    so a crash never leaves a half-written configuration behind.
    """
    if not isinstance(config, MosaicConfig):
        raise TypeError(f"expected a MosaicConfig, got {type(config).__name__}")
    unknown = dict(unknown or {})
    clashing = sorted(k for k in unknown if k in _FIELD_NAMES or k in ALIASES)
    if clashing:
        raise ValueError(f"unknown entries must not carry known keys: {', '.join(clashing)}")
    write_text_atomic(path, json.dumps({**config_to_dict(config), **unknown}, indent=2) + "\n")
