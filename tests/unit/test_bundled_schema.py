"""The bundled label schema (configs/schemas/label.json): every file under configs/ is matched by a package-data
glob (so the wheel ships it), the schema is found by its bundled name from any directory, validates a one-label
reply, and eval-answers reads the label of such a reply from generation_json."""

import tomllib
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation.answers import read_label
from pipeline.llm.structured import BUNDLED_SCHEMAS, StructuredOutput, dumps, load_schema
from pipeline.resources import BUNDLES, SOURCE_ROOT

LABEL = "configs/schemas/label.json"


def _shipped(source_dir: str) -> set[Path]:
    """Files of a bundled source directory that pyproject.toml's package-data globs put into the wheel."""
    setuptools = tomllib.loads((SOURCE_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = BUNDLES[source_dir]
    assert setuptools["package-dir"][package] == source_dir and package in setuptools["packages"]
    root = SOURCE_ROOT / source_dir
    shipped: set[Path] = set()
    for pkg, globs in setuptools["package-data"].items():
        if pkg == package or pkg.startswith(package + "."):
            base = root.joinpath(*pkg[len(package):].split(".")[1:])
            assert pkg in setuptools["packages"], f"{pkg}: package-data of a package the wheel does not list"
            shipped |= {p for g in globs for p in base.glob(g) if p.is_file()}
    return shipped


def test_every_file_under_configs_ships_in_the_wheel():
    root = SOURCE_ROOT / "configs"
    files = {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert root / "schemas" / "label.json" in files
    missing = sorted(str(p.relative_to(SOURCE_ROOT)) for p in files - _shipped("configs"))
    assert not missing, f"not matched by pyproject.toml [tool.setuptools.package-data]: {missing}"


def test_bundled_schema_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert LABEL in BUNDLED_SCHEMAS
    schema = load_schema(LABEL)
    assert schema["properties"]["label"]["enum"] == ["yes", "no", "maybe"]
    assert schema["required"] == ["label", "reason"] and schema["additionalProperties"] is False
    with pytest.raises(ConfigError, match=r"cannot read response_format schema.*bundled schemas: configs/schemas"):
        load_schema("configs/schemas/nope.json")
    own = tmp_path / "configs" / "schemas" / "label.json"  # the user's own file of that name wins
    own.parent.mkdir(parents=True)
    own.write_text('{"type": "object", "properties": {"label": {"enum": ["a", "b"]}}}', encoding="utf-8")
    assert load_schema(LABEL)["properties"]["label"]["enum"] == ["a", "b"]


def test_a_reply_of_the_bundled_schema_is_one_parseable_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    so = StructuredOutput.from_file(LABEL)
    assert so.name == "label"
    value, err = so.parse('{"label": "maybe", "reason": "The evidence is mixed: yes in mice, no in humans."}')
    assert err is None
    # the reason names other labels; the label field alone decides
    read = read_label("ignored", ["yes", "no", "maybe"], structured=value)
    assert read.label == "maybe" and read.source == "json"
    assert dumps(value).startswith('{"label":"maybe"')
    for bad in ('{"label": "perhaps", "reason": "x"}', '{"label": "yes"}', '{"label": "yes", "reason": "' +
                "x" * 121 + '"}', '{"label": "yes", "reason": "x", "confidence": 1}'):
        assert so.parse(bad)[0] is None, bad
