"""The command-line layer: `xcross-train`, `xcross-evaluate`, `xcross-prepare` (also `python -m xcross.cli.<name>`).
It sits on top of the library and of `data_prep`; nothing in the library imports it."""
