"""release.toml: defaults, round trip, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ks4release.config import (
    CustomTile,
    EngineSection,
    ReleaseConfig,
    ReleaseSection,
    SurveySection,
    config_to_toml,
    load_config,
    save_config,
)
from ks4release.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "release.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_every_default(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config == ReleaseConfig()
    assert config.release_dir == tmp_path.resolve()
    assert config.survey.bands == ("B", "V", "R", "I")


def test_saved_config_reads_back_equal(tmp_path):
    config = ReleaseConfig(
        release=ReleaseSection(name="demo"),
        survey=SurveySection(
            bands=("B", "I"),
            camera_scale=0.0625,
            custom_tiles=(CustomTile(name="0000.000-62", ra=0.0, dec=-62.0),
                          CustomTile(name="0001.004-62", ra=0.12, dec=-62.0)),
        ),
        engine=EngineSection(workers=2),
    )
    path = save_config(config, tmp_path / "release.toml")
    assert load_config(path) == config
    text = path.read_text()
    assert "# Worker processes" in text and "[[survey.custom_tiles]]" in text


@given(workers=st.integers(0, 64), scale=st.floats(0.001, 1.0), name=st.text(min_size=1).filter(str.strip))
def test_round_trip_property(tmp_path_factory, workers, scale, name):
    config = ReleaseConfig(
        release=ReleaseSection(name=name),
        survey=SurveySection(camera_scale=scale),
        engine=EngineSection(workers=workers),
    )
    path = save_config(config, tmp_path_factory.mktemp("cfg") / "release.toml")
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[engine]\nworkrs = 2\n", "engine.workrs", "did you mean 'workers'"),
        ("[engin]\nworkers = 2\n", "engin", "did you mean 'engine'"),
        ("[engine]\nworkers = 'two'\n", "engine.workers", "expected int, got string"),
        ("[engine]\nworkers = -1\n", "engine", "workers must be >= 0"),
        ("[survey]\nbands = ['B', 'Z']\n", "survey", "unknown band 'Z'"),
        ("[survey]\ntiles = ['9999.000-00']\n", "survey", "not a KS4 grid tile"),
        ("[refcat.gaia_xp]\nsource = 'ftp'\n", "refcat.gaia_xp", "source must be one of"),
        ("[[survey.custom_tiles]]\nname = 'x'\nra = 400.0\ndec = 0.0\n", "survey.custom_tiles[0]", "ra must be in"),
        ("[[survey.custom_tiles]]\nname = 'x'\n", "survey.custom_tiles[0]", "missing"),
        ("[release\n", "-", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = str(info.value)
    assert str(path) in error
    assert key in error
    assert message in error


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_toml_lists_every_section():
    text = config_to_toml(ReleaseConfig())
    for table in ("[release]", "[inputs]", "[survey]", "[refcat.gaia_dr3]", "[engine]"):
        assert table in text
