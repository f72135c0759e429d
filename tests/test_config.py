"""Tests for zemosaic_config: defaults, JSON round trip, aliases and validation."""

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import pytest

# Let plain `pytest` (not only `python -m pytest`) import the top-level modules.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zemosaic_config import (  # noqa: E402
    CHOICES,
    FIELD_EXPECTED,
    FIELD_HELP,
    ConfigError,
    MosaicConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_file,
    save_config,
)

EXPECTED_DEFAULTS = {
    "input_folder": "",
    "output_folder": "",
    "stacking_normalize_method": "linear_fit",
    "stacking_weighting_method": "noise_variance",
    "stacking_rejection_algorithm": "winsorized_sigma_clip",
    "stacking_kappa_low": 3.0,
    "stacking_kappa_high": 3.0,
    "stacking_winsor_limits": (0.05, 0.05),
    "stacking_final_combine_method": "mean",
    "stacking_kappa_max_iterations": 5,
    "align_method": "astroalign",
    "stacking_cfa_method": "debayer",
    "drizzle_scale": 1,
    "drizzle_pixfrac": 0.0,
    "drizzle_kernel": "square",
    "correct_hot_pixels": True,
    "saturation_level": 0.0,
    "frame_screening": True,
    "screen_min_star_fraction": 0.5,
    "screen_max_fwhm_ratio": 1.5,
    "screen_max_background_ratio": 1.5,
    "screen_kappa": 3.0,
    "force_resolve_existing_wcs": False,
    "astap_executable_path": "",
    "astap_data_directory_path": "",
    "astap_default_search_radius": 3.0,
    "plate_solve_timeout_s": 60.0,
    "cluster_panel_threshold": 0.0,
    "max_raw_per_master_tile": 0,
    "assembly_engine": "fast",
    "final_grid": "north_up",
    "background_model_order": 1,
    "match_background": True,
    "assembly_feather_px": 256.0,
    "final_background_extraction": False,
    "final_background_order": 2,
    "intertile_photometric_match": True,
    "use_gpu_phase5": False,
    "two_pass_coverage_renorm": False,
    "two_pass_cov_sigma_px": 50.0,
    "two_pass_cov_gain_clip": (0.85, 1.18),
    "logging_level": "INFO",
    "save_channel_files": False,
    "save_final_as_uint16": False,
    "resume": "auto",
    "num_processing_workers": 0,
    "dask_scheduler": "",
    "watch_batch_frames": 10,
    "watch_batch_seconds": 120.0,
}


def test_defaults_match_specification():
    config = MosaicConfig()
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert values == EXPECTED_DEFAULTS
    assert config_from_dict({}) == config


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MosaicConfig().stacking_kappa_low = 1.0  # type: ignore[misc]


def test_field_tables_cover_every_field():
    names = set(EXPECTED_DEFAULTS)
    assert set(FIELD_HELP) == names and set(FIELD_EXPECTED) == names
    assert all(text.strip() and "\n" not in text for text in FIELD_HELP.values())
    assert CHOICES["stacking_normalize_method"] == ("linear_fit", "sky_mean", "none")
    assert CHOICES["stacking_rejection_algorithm"] == (
        "winsorized_sigma_clip", "kappa_sigma", "none")
    assert CHOICES["assembly_engine"] == ("fast", "reproject")
    assert CHOICES["logging_level"] == ("ERROR", "WARNING", "INFO", "DEBUG")
    assert "stacking_kappa_low" not in CHOICES


def test_json_round_trip(tmp_path):
    config = MosaicConfig(
        input_folder="/data/in", output_folder="/data/out", stacking_kappa_low=2.5,
        stacking_winsor_limits=(0.1, 0.2), max_raw_per_master_tile=40,
        assembly_engine="reproject", use_gpu_phase5=True, logging_level="DEBUG",
        two_pass_cov_gain_clip=(0.9, 1.1))
    path = tmp_path / "run.json"
    save_config(config, path)
    assert load_config(path) == config
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert list(saved) == list(EXPECTED_DEFAULTS)  # canonical keys, field order
    assert saved["stacking_winsor_limits"] == [0.1, 0.2]
    assert "\n  " in path.read_text(encoding="utf-8")  # indented
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left behind


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old", encoding="utf-8")
    save_config(MosaicConfig(stacking_kappa_high=4.0), path)
    assert load_config(path).stacking_kappa_high == 4.0


def test_config_to_dict_is_json_able():
    data = config_to_dict(MosaicConfig())
    assert data["two_pass_cov_gain_clip"] == [0.85, 1.18]
    assert json.loads(json.dumps(data)) == data


def test_aliases():
    config = config_from_dict({"input_dir": "/a", "output_dir": "/b", "use_gpu": True})
    assert (config.input_folder, config.output_folder, config.use_gpu_phase5) == ("/a", "/b", True)


def test_upstream_keys_with_an_equivalent_are_mapped(caplog):
    upstream = {"input_dir": "/a", "output_dir": "/b", "match_background_for_final": False,
                "save_final_as_uint16": True, "final_assembly_method": "reproject_coadd",
                "num_processing_workers": -1}
    with caplog.at_level(logging.INFO, logger="zemosaic_config"):
        config = config_from_dict(upstream)
    assert config.match_background is False and config.save_final_as_uint16 is True
    assert config.num_processing_workers == 0  # upstream's -1: automatic, one per core
    # Upstream keys with no equivalent here: named once at INFO, no warning.
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Ignoring upstream ZeMosaic keys that have no equivalent here: final_assembly_method")]


@pytest.mark.parametrize("key, meant", [
    ("kappa_low", "stacking_kappa_low"),          # the last parts of a key
    ("StackingKappaLow", "stacking_kappa_low"),   # other case, no separators
    ("stacking-kappa-low", "stacking_kappa_low"),
    ("resume_mode", "resume"),                    # a key with a part added
    ("stacking_kapa_low", "stacking_kappa_low"),  # one edit
])
def test_a_variant_of_a_known_key_is_an_error_naming_it(key, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'") as info:
        config_from_dict({key: 2.0})
    assert info.value.key == key


def test_upstream_keys_resembling_known_ones_are_never_an_error(caplog):
    with caplog.at_level(logging.INFO, logger="zemosaic_config"):
        config = config_from_dict({"use_gpu_global": True, "stack_use_gpu": True})
    assert config.use_gpu_phase5 is False
    assert "stack_use_gpu, use_gpu_global" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unknown_entries_come_back_and_are_saved_untouched(tmp_path):
    path = tmp_path / "upstream.json"
    path.write_text(json.dumps({"qt_theme_mode": "dark", "stacking_kappa_low": 2.0,
                                "input_dir": "/a", "winsor_worker_limit": 10,
                                "global_wcs_res_override": None}), encoding="utf-8")
    config, unknown = read_config_file(path)
    assert unknown == {"qt_theme_mode": "dark", "winsor_worker_limit": 10,
                       "global_wcs_res_override": None}
    save_config(config.replace(stacking_kappa_high=4.0), path, unknown)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert list(saved) == [*EXPECTED_DEFAULTS, "qt_theme_mode", "winsor_worker_limit",
                           "global_wcs_res_override"]  # known keys first, then the others
    assert saved["stacking_kappa_high"] == 4.0 and saved["input_folder"] == "/a"
    assert "input_dir" not in saved  # an alias is known: written under its canonical name
    assert read_config_file(path) == (config.replace(stacking_kappa_high=4.0), unknown)
    with pytest.raises(ValueError, match="use_gpu"):
        save_config(config, path, {"use_gpu": True})


def test_alias_with_same_value_as_canonical_key_is_fine():
    config = config_from_dict({"input_dir": "/a", "input_folder": "/a"})
    assert config.input_folder == "/a"


def test_conflicting_alias_and_canonical_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"use_gpu": True, "use_gpu_phase5": False})
    assert "use_gpu" in str(info.value) and "use_gpu_phase5" in str(info.value)


@pytest.mark.parametrize("value", ["0.05,0.1", " 0.05 , 0.1 ", [0.05, 0.1], (0.05, 0.1)])
def test_winsor_limits_forms(value):
    assert config_from_dict({"stacking_winsor_limits": value}).stacking_winsor_limits == (0.05, 0.1)


def test_numbers_are_normalised():
    config = config_from_dict({"stacking_kappa_low": 2, "stacking_kappa_max_iterations": 7.0})
    assert config.stacking_kappa_low == 2.0 and isinstance(config.stacking_kappa_low, float)
    assert config.stacking_kappa_max_iterations == 7
    assert isinstance(config.stacking_kappa_max_iterations, int)


def test_logging_level_lower_case_accepted():
    assert config_from_dict({"logging_level": "debug"}).logging_level == "DEBUG"
    assert config_from_dict({"logging_level": "Warning"}).logging_level == "WARNING"


@pytest.mark.parametrize("key, value", [
    ("stacking_normalize_method", "median_fit"),
    ("stacking_rejection_algorithm", "Kappa_Sigma"),
    ("assembly_engine", 3),
    ("logging_level", "VERBOSE"),
    ("stacking_kappa_low", -1.0),
    ("stacking_kappa_high", 0),
    ("stacking_kappa_low", True),
    ("stacking_kappa_high", "3"),
    ("two_pass_cov_sigma_px", float("nan")),
    ("cluster_panel_threshold", -0.5),
    ("stacking_winsor_limits", "0.6,0.05"),
    ("stacking_winsor_limits", [0.05, 0.6]),
    ("stacking_winsor_limits", "0.05"),
    ("stacking_winsor_limits", "a,b"),
    ("two_pass_cov_gain_clip", (1.2, 1.1)),
    ("two_pass_cov_gain_clip", [0.0, 1.2]),
    ("max_raw_per_master_tile", 1),
    ("max_raw_per_master_tile", -3),
    ("max_raw_per_master_tile", 2.5),
    ("stacking_kappa_max_iterations", 0),
    ("match_background", 1),
    ("background_model_order", 3),
    ("background_model_order", 1.5),
    ("final_background_order", 0),
    ("assembly_feather_px", -10.0),
    ("use_gpu_phase5", "yes"),
    ("input_folder", 42),
])
def test_bad_values_raise_config_error_naming_key_and_value(key, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict({key: value})
    message = str(info.value)
    assert key in message and str(value) in message and "expected" in message
    assert info.value.key == key


def test_error_message_format():
    with pytest.raises(ConfigError, match=r"^stacking_kappa_low = -1\.0 is not allowed: "
                                          r"expected a number > 0$"):
        config_from_dict({"stacking_kappa_low": -1.0})


def test_string_number_error_is_explicit():
    with pytest.raises(ConfigError, match="without quotes"):
        config_from_dict({"stacking_kappa_low": "3"})


def test_unknown_keys_give_one_sorted_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="zemosaic_config"):
        config = config_from_dict({"zeta": 1, "alpha": 2, "stacking_kappa_low": 2.0})
    assert config.stacking_kappa_low == 2.0
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    assert records[0].getMessage() == "Ignoring unknown configuration keys: alpha, zeta"


def test_no_warning_without_unknown_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="zemosaic_config"):
        config_from_dict({"use_gpu": False})
    assert not caplog.records


def test_invalid_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "stacking_kappa_low": 2.0,\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "column" in message


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)


def test_bad_value_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"max_raw_per_master_tile": 1}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "max_raw_per_master_tile = 1" in str(info.value)


def test_replace_validates():
    config = MosaicConfig()
    changed = config.replace(stacking_kappa_low=2, stacking_winsor_limits="0.1,0.1")
    assert changed.stacking_kappa_low == 2.0 and changed.stacking_winsor_limits == (0.1, 0.1)
    assert config.stacking_kappa_low == 3.0  # original untouched
    with pytest.raises(ConfigError, match="stacking_kappa_low = -2"):
        config.replace(stacking_kappa_low=-2)
    with pytest.raises(ConfigError, match="no_such_key"):
        config.replace(no_such_key=1)


@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_json_is_a_config_error(tmp_path, opening, closing):
    for depth in (100_000, 900):
        path = tmp_path / f"deep{depth}.json"
        path.write_text('{"stacking_winsor_limits": ' + opening * depth + "1" + closing * depth + "}")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert str(path) in message and len(message) < 300 and "\n" not in message
