"""`python -m builders <subcommand>`: one module per subcommand, each with `add_arguments(parser)` and `run(args)`."""

import argparse
import importlib

SUBCOMMANDS = {
    "tiny": "builders.tiny",
    "logits": "builders.logits",
    "repository": "builders.repository",
    "convert": "builders.convert",
    "verify": "builders.verify",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builders")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in SUBCOMMANDS.items()}
    for name, module in modules.items():
        module.add_arguments(subparsers.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    modules[args.command].run(args)


if __name__ == "__main__":
    main()
