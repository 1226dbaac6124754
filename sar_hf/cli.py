"""The `sar-hf` command: `sar-hf train [flags]` and `sar-hf inspect [flags]`.

Each command is a module of `sar_hf.scripts` with a `main(args)`, imported only when it runs;
`sar-hf COMMAND --help` lists its flags. Launchers that start several processes run the command
as a module: `accelerate launch [--config_file ...] -m sar_hf train [flags]`, or
`torchrun --nproc_per_node N -m sar_hf train [flags]`.
"""

import argparse
import importlib
import sys

#: command -> (the module whose `main(args)` runs it, its one-line help)
COMMANDS = {
    "train": (
        "sar_hf.scripts.train",
        "Train or fine-tune a ViT-family image classifier with the spatial-entropy regulariser (examples/run_sar.py).",
    ),
    "inspect": (
        "sar_hf.scripts.inspect_attention",
        "Measure the spatial entropy of any ViT-family checkpoint's [CLS] attention, per layer and head.",
    ),
}


def main(argv: list[str] | None = None) -> None:
    """Runs `sar-hf` on `argv` (default: the command line)."""
    parser = argparse.ArgumentParser(
        prog="sar-hf",
        description="Spatial-entropy regularisation (SAR) for Vision Transformers in Hugging Face Transformers.",
        epilog="`sar-hf COMMAND --help` lists the flags of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        # No help flag of its own: `--help` after the command goes to the command's parser.
        commands.add_parser(name, help=summary, add_help=False)
    parsed, args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    importlib.import_module(COMMANDS[parsed.command][0]).main(args)


__all__ = ["COMMANDS", "main"]
