"""CLI: help text for every command, CLI flags match config fields, no heavy imports for --help."""

import subprocess
import sys

from click.testing import CliRunner

from pipeline.cli import CONFIG_FLAGS, main
from pipeline.config import field_docs
from tests.runtools import unreached_store_args

HEAVY = ("torch", "chromadb", "sentence_transformers", "matplotlib")


def test_every_command_has_help_text():
    runner = CliRunner()
    main._load()
    assert main.commands, "no commands registered"
    for name, cmd in main.commands.items():
        assert cmd.help and cmd.help.strip(), f"command {name} has no help"
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, res.output
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{name} --{p.name} has no help"


def test_cli_flags_map_to_real_config_fields():
    main._load()
    docs = field_docs()
    assert CONFIG_FLAGS
    for param, key in CONFIG_FLAGS.items():
        assert key in docs, f"--{param} maps to unknown config field {key}"


def test_help_imports_no_heavy_library():
    code = (
        "import sys, runpy\n"
        "import pipeline.cli\n"
        "sys.argv = ['rag-pipeline', '--help']\n"
        "try:\n    pipeline.cli.main()\nexcept SystemExit:\n    pass\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_run_rejects_bad_input_before_starting_anything(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"id": 1, "query": "ok"}\n{"id": 2}\n')
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", str(bad), "--output", str(tmp_path / "out"),
         *unreached_store_args(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2
    assert f"{bad}:2: field 'query': missing or empty query" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_command_modules_import_no_heavy_library():
    # Each command module imports torch / chromadb / sentence_transformers / matplotlib only inside the command
    # that needs them: importing every command (what `rag-pipeline --help` does) stays cheap.
    code = (
        "import sys\n"
        "from pipeline.cli import _commands\n"
        "cmds = _commands()\n"
        "print('COMMANDS', len(cmds))\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "COMMANDS 12" in out, out
    assert "HEAVY []" in out, out


def test_python_dash_m_pipeline_is_the_cli():
    res = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "run" in res.stdout and "ingest" in res.stdout
