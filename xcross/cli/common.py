"""What the training and evaluation commands share: their flags (one per setting of `settings.SETTINGS`), the
configuration built from them, and the bootstrapping of the embedded defaults (demo world, converted weights)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..distributed import barrier, dist_info, init_distributed
from ..rundir import read_config
from ..experiment import prepare
from ..settings import (DEFAULT_DATA_DIR, SETTINGS, RunConfig, UsageError, available_domains, default_model_dir,
                        help_text, problems, resolve, resolve_device)

def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


PARSE = {int: int, float: float, str: str, tuple: _parse_list}


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True,
                      only: tuple[str, ...] | None = None) -> None:
    """One flag per setting of the table (`settings.SETTINGS`) that has one, with its help and every preset's value
    read from there; `only`: just these dotted paths. A flag not given leaves the setting to the config file, the
    preset or the default (`config_from_args`)."""
    if only is None:
        parser.add_argument("--config", type=Path, default=None,
                            help="a JSON (or TOML) file of settings, nested as a run's config.json (which is one: it "
                                 "reproduces its run); flags given on the command line override it")
    for setting in SETTINGS:
        if setting.option is None or (only is not None and setting.path not in only) or \
                (setting.path == "method" and not with_method):
            continue
        if setting.kind is bool:  # the one switch: --no-train-sources
            parser.add_argument(setting.option, dest=setting.path, action="store_const", const=False, default=None,
                                help=f"do not {setting.help}")
            continue
        parser.add_argument(setting.option, dest=setting.path, type=PARSE[setting.kind], default=None,
                            metavar=_metavar(setting),
                            help=help_text(setting))
    if only is None:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last "
                                                                  "checkpoint")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _metavar(setting) -> str:
    if setting.choices and setting.kind is str:
        return "{" + ",".join(setting.choices) + "}"
    if setting.path in ("out", "data.data_dir", "model.model_dir"):
        return "DIR"
    return {int: "N", float: "X", tuple: "A,B,..."}.get(setting.kind, "NAME")


def read_config_file(path: Path) -> RunConfig:
    """A `--config` file: JSON, or TOML (`.toml`, read with the standard library's tomllib)."""
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (ValueError, ImportError) as err:  # JSONDecodeError, TOMLDecodeError; tomllib needs Python >= 3.11
        raise UsageError(f"--config {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {err}") \
            from None
    if path.suffix.lower() != ".toml":
        return read_config(path, where=f"--config {path}")  # a run's own config.json: the run where it now is
    return RunConfig.from_dict(data, where=f"--config {path}")


def given_flags(args: argparse.Namespace) -> dict:
    """The settings given as flags, by dotted path."""
    return {s.path: getattr(args, s.path) for s in SETTINGS if getattr(args, s.path, None) is not None}


def config_from_args(args: argparse.Namespace, method: str | None = None) -> RunConfig:
    """The resolved configuration: the `--config` file's settings (or none), every flag given, then the preset for
    what neither gave."""
    base = read_config_file(args.config) if args.config else RunConfig.from_dict({})
    explicit = given_flags(args)
    if method is not None:
        explicit["method"] = method
    if {"preset", "model.device"} & set(explicit):  # a run's config.json with another preset: resolved again
        base = replace(base, preset_reason="")
    return resolve(base.with_values(explicit))


def bootstrap(config: RunConfig) -> None:
    """Generate the demo world and convert the default weights where the config asks for them and they are
    missing, once the request is known to be otherwise sound (nothing is generated for a request that is refused).
    Under torchrun the process group is joined first, so that only rank 0 writes them."""
    if found := problems(config):
        raise UsageError("; ".join(found))
    data_dir = Path(config.data.data_dir)
    if not available_domains(data_dir):
        if data_dir.resolve() != Path(DEFAULT_DATA_DIR).resolve():
            raise UsageError(f"no processed domains in {data_dir}; build them with `xcross-prepare csv` / "
                             "`xcross-prepare amazon`, or omit --data-dir to use the demo world")
        from data_prep.synthetic import DOMAINS
        if unknown := [d for d in (config.target, *config.sources) if d not in DOMAINS]:
            raise UsageError(f"unknown domain(s) {', '.join(unknown)}: the demo world ({data_dir}, generated on first "
                             f"use) has {', '.join(DOMAINS)}; name your data with --data-dir")
    resolve_device(config.model.device)
    init_distributed(resolve_device(config.model.device))
    if not available_domains(data_dir):
        if dist_info().main:
            from data_prep.synthetic import generate_world
            print(f"generating the demo world into {data_dir} ...")
            generate_world(data_dir)
        barrier()
    if config.model.model_dir is None and not (default_model_dir() / "conversion.json").is_file():
        if dist_info().main:
            from data_prep.gemma import ConversionError, convert
            try:
                convert(default_model_dir())
            except ConversionError as err:
                raise UsageError(str(err)) from err
        barrier()


def prepare_or_bootstrap(config: RunConfig) -> RunConfig:
    """`bootstrap`, then the config prepared (`experiment.prepare`): what a command that trains or scores runs on."""
    bootstrap(config)
    return prepare(config)


def finish_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
