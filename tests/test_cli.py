import subprocess
import sys

from cosy import __version__, cli


def test_version_and_help_list_every_command():
    out = subprocess.run([sys.executable, "-m", "cosy.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"cosy {__version__}"
    out = subprocess.run([sys.executable, "-m", "cosy.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_every_registered_command_has_a_module_with_the_entry_points():
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "add_arguments", None)), name
        assert callable(getattr(module, "run", None)), name


def test_unknown_command_and_incomplete_verb_fail(capsys):
    assert cli.main(["extract"]) == 2
    assert "extract tokens" in capsys.readouterr().err
    try:
        cli.main(["nonsense"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown command must exit with an error")
