"""Typed config: defaults documented, precedence CLI > file > defaults, unknown keys rejected."""

import dataclasses

import pytest

from pipeline.config import Config, field_docs, load_config
from pipeline.errors import ConfigError


def test_every_field_has_a_default_and_a_doc():
    docs = field_docs()
    assert len(docs) > 40
    for key, doc in docs.items():
        assert doc and doc.strip(), key
    cfg = Config()
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[retrieval]\ntop_k = 7\nmin_score = 0.5\n")
    cfg = load_config(f, {"retrieval.top_k": 3, "retrieval.min_score": None})
    assert cfg.retrieval.top_k == 3  # CLI wins
    assert cfg.retrieval.min_score == 0.5  # file wins over default
    assert cfg.generation.max_tokens == Config().generation.max_tokens


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[retrieval]\ntopk = 7\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key 'topk' in \[retrieval\]"):
        load_config(f)
    f.write_text("[nosuch]\na = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[nosuch\]"):
        load_config(f)


def test_wrong_type_and_bad_choice(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[retrieval]\ntop_k = "five"\n')
    with pytest.raises(ConfigError, match="top_k: expected an integer"):
        load_config(f)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, {"rag.mode": "bogus"})


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_list_fields_accept_comma_strings():
    cfg = load_config(None, {"servers.endpoints": "http://a:1, http://b:2"})
    assert cfg.servers.endpoints == ("http://a:1", "http://b:2")


def test_config_command_prints_a_loadable_documented_toml(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["config"])
    assert res.exit_code == 0, res.output
    assert "[retrieval]\n# Chunks returned per query.\ntop_k = 5\n" in res.output
    f = tmp_path / "all.toml"
    f.write_text(res.output)
    assert load_config(f) == load_config()  # round trip: every printed key is known and typed


def test_numeric_ranges_name_the_key_and_cover_every_field(tmp_path):
    from pipeline.config import RANGES

    known = {(s.name, f.name): f.type for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory())}
    assert set(RANGES) <= set(known), set(RANGES) - set(known)  # no typo in the table
    for key, value, msg in [("generation.num_processes", 0, "num_processes: must be >= 1"),
                            ("run.part_rows", -3, "part_rows: must be >= 1"),
                            ("retrieval.min_score", -1.5, "min_score: must be >= -1.0"),
                            ("llm.read_timeout_s", 0.0, "read_timeout_s: must be >= 0.001"),
                            ("servers.base_port", 70000, "base_port: must be <= 65535"),
                            ("run.grace_s", -1.0, "grace_s: must be >= 0"),  # not in the table: >= 0
                            ("llm.backoff_initial_s", float("nan"), "got nan")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, {key: value})
    p = tmp_path / "c.toml"
    p.write_text("[ingest]\nchunk_chars = 100\nchunk_overlap = 100\n")
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_config(p)
    assert load_config(None, {"servers.gpus": -1, "retrieval.min_score": -0.5}).servers.gpus == -1
