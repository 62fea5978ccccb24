"""`python -m tools <subcommand>`: checks of what `builders` made (`logits`, `verify`); the demo is `python -m tools.demo`."""

from builders.cli import run_subcommands

SUBCOMMANDS = {
    "logits": "tools.logits",
    "verify": "tools.verify",
}


def main(argv: list[str] | None = None) -> None:
    run_subcommands("python -m tools", SUBCOMMANDS, argv)


if __name__ == "__main__":
    main()
