"""`xcross-prepare amazon|csv|synthetic|gemma ...`: one command for every importer and the weight converter; each
subcommand takes the flags of its module (`xcross-prepare amazon --help`)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, what it does)
COMMANDS = {
    "amazon": ("data_prep.amazon", "import Amazon reviews 2014 / 2018 / 2023 files"),
    "csv": ("data_prep.tabular", "import interactions.csv + items.csv"),
    "synthetic": ("data_prep.synthetic", "generate the synthetic demo world"),
    "gemma": ("data_prep.gemma", "convert the Gemma 3 270M GGUF from PyPI into a model directory"),
}


def usage() -> str:
    lines = ["usage: xcross-prepare {" + ",".join(COMMANDS) + "} [flags]", "", __doc__.strip(), ""]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"xcross-prepare {name}")


if __name__ == "__main__":
    sys.exit(main())
