"""The `sar-hf` command (sar_hf/cli.py): its help, and that each command reaches its script with its arguments.

The commands themselves are tested in test_run_sar.py (`train`, also under two launchers) and
test_inspect.py (`inspect`).
"""

import os
import subprocess
import sys

import pytest

from sar_hf import cli
from sar_hf.scripts import inspect_attention, train

SAR_HF = os.path.join(os.path.dirname(sys.executable), "sar-hf")  # the console script, installed with the package


def _run(*command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_the_console_script_and_python_m_run_the_command():
    """The installed `sar-hf` lists the commands; `python -m sar_hf` reaches a command's own help."""
    done = _run(SAR_HF, "--help")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "inspect" in done.stdout and "COMMAND --help" in done.stdout
    done = _run(sys.executable, "-m", "sar_hf", "inspect", "--help")
    assert done.returncode == 0 and "usage: sar-hf inspect" in done.stdout, done.stderr


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            "train",
            [
                "usage: sar-hf train",
                "--sar_weight",
                "--recipe",
                "--learning_rate",
                "examples:",
                "my_run.json",
                # The description and the examples as written (line breaks kept), each flag's default after its help.
                "\n\nTrain or fine-tune a ViT-family image classifier with the spatial-entropy regulariser (SAR).\n\n"
                "With no arguments: the `small` preset (4 layers, 192 wide, 32 px images in 4 px patches) from\n",
                "\nexamples:\n  sar-hf train          ",
                "0 trains the plain ViT baseline with everything else identical. (default: 0.01)\n",
            ],
        ),
        ("inspect", ["usage: sar-hf inspect", "--model", "--images", "--layers", "--batch_size", "--output"]),
    ],
)
def test_each_command_has_its_own_help(capsys, monkeypatch, command, expected):
    """`--help` after a command reaches that command's parser."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping but the text's own
    with pytest.raises(SystemExit) as raised:
        cli.main([command, "--help"])
    assert raised.value.code == 0
    printed = capsys.readouterr().out
    for text in expected:
        assert text in printed, text


@pytest.mark.parametrize(
    "argv, message", [([], "the following arguments are required: COMMAND"), (["tain"], "invalid choice: 'tain'")]
)
def test_a_missing_or_unknown_command_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command, module", [("train", train), ("inspect", inspect_attention)])
def test_a_command_runs_its_script_with_the_rest_of_the_arguments(monkeypatch, command, module):
    seen = []
    monkeypatch.setattr(module, "main", seen.append)
    assert cli.main([command, "--output_dir", "x", "--flag=1", "y.json"]) is None  # a console script's exit code 0
    assert seen == [["--output_dir", "x", "--flag=1", "y.json"]]


def test_the_top_level_help_names_the_program_and_summarises_each_command(capsys, monkeypatch):
    """`sar-hf --help` in this process: the program's name, its description, one line per command, the epilog."""
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width: one line per paragraph
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "usage: sar-hf [-h] COMMAND ..."
    assert "Spatial-entropy regularisation (SAR) for Vision Transformers in Hugging Face Transformers." in lines
    assert lines[-1] == "`sar-hf COMMAND --help` lists the flags of a command."
    for name, (_, summary) in cli.COMMANDS.items():
        assert [name, summary] in [line.split(None, 1) for line in lines], name


def test_without_arguments_the_command_line_is_read(monkeypatch):
    """`cli.main()` (the console script's entry point) takes its arguments from `sys.argv` after the program."""
    seen = []
    monkeypatch.setattr(train, "main", seen.append)
    monkeypatch.setattr(sys, "argv", ["sar-hf", "train", "--output_dir", "x"])
    cli.main()
    assert seen == [["--output_dir", "x"]]
