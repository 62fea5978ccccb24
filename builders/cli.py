"""Subcommand dispatch shared by `python -m builders` and `python -m tools`: one module per subcommand, each with
`add_arguments(parser)` and `run(args)`; its docstring's first line is the help."""

import argparse
import importlib


def run_subcommands(prog: str, subcommands: dict[str, str], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog)
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in subcommands.items()}
    for name, module in modules.items():
        module.add_arguments(subparsers.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    modules[args.command].run(args)
