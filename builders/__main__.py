"""`python -m builders <subcommand>`: the offline artifacts (checkpoints, deployments, Triton repositories)."""

from builders.cli import run_subcommands

SUBCOMMANDS = {
    "tiny": "builders.tiny",
    "repository": "builders.repository",
    "convert": "builders.convert",
}


def main(argv: list[str] | None = None) -> None:
    run_subcommands("python -m builders", SUBCOMMANDS, argv)


if __name__ == "__main__":
    main()
