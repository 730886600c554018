"""Choice lists: declared once on the config field, checked by config validation, offered by the CLI.

Pure functions and click objects only: no process, no model, no network.
"""

from __future__ import annotations

import dataclasses

import click
import pytest

from pipeline.config import Config, choices, field_choices, field_docs, load_config, merge
from pipeline.errors import ConfigError

EXPECTED = {
    "store.shared": ("auto", "on", "off"),
    "ingest.on_error": ("fail", "skip"),
    "retrieval.mode": ("dense", "bm25", "hybrid"),
    "retrieval.fusion": ("chunk", "document"),
    "retrieval.bm25_language": ("english", "none"),
    "servers.backend": ("auto", "sglang", "llamacpp"),
    "rag.mode": ("retrieve+answer", "retrieve"),
    "run.on_bad_record": ("fail", "skip"),
}


def _cli_options() -> list[tuple[str, click.Option, str]]:
    """(command, option, config key) for every config flag of every command."""
    from pipeline.cli import main
    from pipeline.cli.options import CONFIG_FLAGS

    main._load()
    out = []
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name in CONFIG_FLAGS:
                out.append((name, p, CONFIG_FLAGS[p.name]))
    return out


def test_the_declared_choice_fields():
    assert field_choices() == EXPECTED


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_choices_reads_the_field(key):
    assert choices(key) == EXPECTED[key]


def test_a_field_without_choices_has_none():
    assert choices("retrieval.top_k") == ()
    assert choices("store.path") == ()


def test_choices_of_an_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="retrieval.modes"):
        choices("retrieval.modes")


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_choice_field_rejects_a_bad_value_naming_the_key(key):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        merge(Config(), {section: {name: "bogus"}}, "c.toml")
    msg = str(err.value)
    assert msg.startswith(f"c.toml: [{section}] {name}: 'bogus' is not one of ")
    assert msg.endswith(", ".join(EXPECTED[key]))


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_choice_is_accepted(key):
    section, name = key.split(".")
    for value in EXPECTED[key]:
        cfg = merge(Config(), {section: {name: value}}, "c.toml")
        assert getattr(getattr(cfg, section), name) == value


def test_choice_check_is_case_sensitive():
    with pytest.raises(ConfigError, match="'Hybrid' is not one of dense, bm25, hybrid"):
        merge(Config(), {"retrieval": {"mode": "Hybrid"}}, "x")


def test_override_from_the_command_line_names_the_source():
    with pytest.raises(ConfigError, match=r"^command line: \[run\] on_bad_record: 'ignore' is not one of fail, skip$"):
        load_config(None, {"run.on_bad_record": "ignore"})


def test_a_non_string_value_of_a_choice_field_is_a_type_error():
    with pytest.raises(ConfigError, match=r"\[store\] shared: expected a string, got True"):
        merge(Config(), {"store": {"shared": True}}, "x")


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_every_default_is_one_of_its_choices(key):
    section, name = key.split(".")
    assert getattr(getattr(Config(), section), name) in EXPECTED[key]


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_the_field_doc_names_every_choice(key):
    doc = field_docs()[key]
    for value in EXPECTED[key]:
        assert f"'{value}'" in doc, f"{key}: doc does not mention '{value}'"


def test_choice_fields_are_strings():
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):
            if "choices" in f.metadata:
                assert f.type in (str, "str"), f"{sec.name}.{f.name}"
                assert all(isinstance(c, str) for c in f.metadata["choices"])


def test_every_cli_option_of_a_choice_field_offers_exactly_its_choices():
    seen = set()
    for cmd, opt, key in _cli_options():
        if key in EXPECTED:
            assert isinstance(opt.type, click.Choice), f"{cmd} --{opt.name}: not a click.Choice"
            assert tuple(opt.type.choices) == EXPECTED[key], f"{cmd} --{opt.name}"
            seen.add(key)
        else:
            assert not isinstance(opt.type, click.Choice), f"{cmd} --{opt.name}: choices not declared on {key}"
    # the CLI exposes these choice fields (bm25_language is an index setting, config file only)
    assert seen == set(EXPECTED) - {"retrieval.bm25_language"}


def test_backend_option_of_run_and_serve_agree():
    backends = [opt.type.choices for cmd, opt, key in _cli_options() if key == "servers.backend"]
    assert len(backends) == 2 and all(tuple(b) == EXPECTED["servers.backend"] for b in backends)


def test_config_option_refuses_a_second_declaration_of_choices():
    from pipeline.cli.options import config_option

    with pytest.raises(RuntimeError, match="declares its choices"):
        config_option("--x-mode", key="retrieval.mode", type=click.Choice(["dense"]))


def test_config_option_refuses_an_unknown_key():
    from pipeline.cli.options import config_option

    with pytest.raises(KeyError):
        config_option("--x", key="retrieval.nosuch")


def test_eval_retrieval_mode_list_uses_the_config_choices():
    from pipeline.cli.corpus import _modes

    assert _modes("all") == list(EXPECTED["retrieval.mode"])
    assert _modes("bm25, dense,bm25") == ["bm25", "dense"]
    assert _modes(None) is None
    with pytest.raises(click.BadParameter, match="expected dense, bm25, hybrid"):
        _modes("sparse")


def test_library_checks_use_the_config_choices():
    from pipeline.retrieval.bm25 import BM25Settings
    from pipeline.store.mode import decide

    BM25Settings(language="none").check()
    with pytest.raises(ConfigError, match="bm25 language must be one of english, none, got 'french'"):
        BM25Settings(language="french").check()
    with pytest.raises(ConfigError, match=r"\[store\] shared: 'maybe' is not one of auto, on, off"):
        decide("maybe", 2, 0)
    assert decide("off", 2, 0).mode == "local"


def test_iter_source_rejects_an_unknown_on_error(tmp_path):
    from pipeline.corpus.sources import iter_source

    with pytest.raises(ConfigError, match="on_error must be one of fail, skip, got 'ignore'"):
        next(iter(iter_source(tmp_path, on_error="ignore")))
