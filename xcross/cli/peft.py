"""Move LoRA adapters between xcross and PEFT: `export` writes an xcross adapter (or a finished LoRA / merge run) as
a PEFT directory with the scoring head beside it; `import` writes a PEFT LoRA directory as an xcross adapter file."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ..experiment import model_for, place, prepare, train_method
from ..lora import ADAPTER_FORMAT, LoRAConfig
from ..methods import CHECKPOINT_FORMAT, build_model, get_method, load_trained, save_adapter
from ..peft import (HEAD_FILE, adapter_files, check_export_output, check_import_output, export_peft,
                    read_peft_adapter, read_tensors)
from ..rundir import RunDir
from ..settings import SETTINGS, RunConfig, UsageError, resolve
from ..errors import run_command
from ..weights import load_decoder, load_tensors
from .common import add_run_arguments, bootstrap, given_flags

# The settings of xcross-train that training a head over one adapter reads: what "head" reads, less what this
# command gives itself (its target, the adapter's LoRA settings, where the run goes).
HEAD_TRAINING = tuple(s.path for s in SETTINGS if s.role != "not identity" and s.path not in
                      ("target", "method", "sources", "fraction", "train_sources") and not
                      any(s.path == i or s.path.startswith(i + ".") for i in get_method("head").ignores))

IMPORT_EPILOG = f"""\
A PEFT adapter has no scoring head. The file gets a fresh one (it scores every candidate equally: fine for
build_model's X-Cross, ensemble and merge with head_init="fresh", useless zero-shot), unless the directory holds
the {HEAD_FILE} that `export` writes (--head keep, the default). xcross-train cannot train a head over an
imported adapter (its sources are its own LoRA runs), so this command does: --train-head-on DOMAIN trains the head
alone on that domain of --data-dir over the frozen adapter (a "merge" run of the one adapter, selected on
validation) and writes the adapter with that head, as a source adapter file holds them.

Refused with the setting named: DoRA, rank/alpha patterns, bias other than "none", modules_to_save,
layers_to_transform, targets outside q/k/v/o/gate/up/down_proj, base-rewriting initialisations (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA), and an adapter for another base (its base_model_name_or_path against the _name_or_path of
--model-dir's config.json where that records one; always the shapes). rsLoRA (alpha / sqrt(r)) is converted."""

EXPORT_EPILOG = f"""\
ADAPTER: an xcross adapter file (a source adapter, a LoRA run's best.safetensors), or a finished LoRA or merge
run (its directory or best.safetensors; a merge run is rebuilt from its source adapters on its base, or on
--model-dir). X-Cross and ensemble runs hold several adapters mixed by integrators and have no PEFT form.

OUT_DIR gets adapter_config.json and adapter_model.safetensors, which PEFT loads onto the transformers model of
the same base (`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT_DIR)`), and
{HEAD_FILE}, the scoring head: keys dense.weight (d, d), dense.bias (d), out.weight (1, d), out.bias (1);
score = out.weight @ tanh(dense.weight @ h + dense.bias) + out.bias, h the final-normed hidden state (transformers'
hidden_states[-1]) at a candidate's last token. OUT_DIR may be new, empty or a PEFT adapter directory (any other
non-empty directory is refused): only these three files are written there, each replaced whole once all are
written; its other files (the README.md model card PEFT writes, anything else) are kept. OUT_DIR must not be, or
hold, an input of the export."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="an xcross adapter as a PEFT directory", description=__doc__,
                                 epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("adapter", metavar="ADAPTER", help="adapter file or LoRA/merge run (see below)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the PEFT directory to write")
    export.add_argument("--base-name", default=None, help="base_model_name_or_path to record: the HF id or path "
                                                          "of the base (PEFT's AutoPeftModel loads it from there)")
    export.add_argument("--model-dir", default=None, help="base of a merge run (default: the run's own)")

    imp = commands.add_parser("import", help="a PEFT LoRA directory as an xcross adapter file", description=__doc__,
                              epilog=IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("peft_dir", metavar="PEFT_DIR", help="holds adapter_config.json and adapter_model.safetensors")
    imp.add_argument("out_file", metavar="OUT_FILE", help="the xcross adapter file to write (.safetensors)")
    imp.add_argument("--model-dir", required=True, help="the HF-layout base the adapter was trained on")
    imp.add_argument("--head", choices=("keep", "fresh"), default="keep",
                     help=f"keep: the head of an exported adapter ({HEAD_FILE}), where there is one, else fresh "
                          "(default); fresh: always a new head")
    train = imp.add_argument_group("training the head (xcross-train's flags of the same names)")
    train.add_argument("--train-head-on", metavar="DOMAIN", default=None,
                       help="train the head alone on this domain over the frozen adapter")
    train.add_argument("--out", default=None, help="keep the head's training run (config.json, log.jsonl, "
                                                   "results.json) under this runs directory (default: discarded)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_arguments(train, only=("data.data_dir", "preset", *HEAD_TRAINING))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), interrupted="stopped; the output was left as it was")


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "export":
            out = export(Path(args.adapter), Path(args.out_dir), args.base_name, args.model_dir)
            print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors"
                  f"{', ' + HEAD_FILE if (out / HEAD_FILE).is_file() else ''})")
        else:
            print(import_(args))
    except (ValueError, FileExistsError) as err:  # what the adapter readers and writers refuse: a bad request
        raise UsageError(str(err)) from err
    return 0


def export(adapter: Path, out_dir: Path, base_name: str | None, model_dir: str | None) -> Path:
    """`xcross-peft export`: an adapter file as it is; a run's best.safetensors by its format."""
    best = adapter / "best.safetensors" if adapter.is_dir() else adapter
    if not best.is_file():
        raise UsageError(f"{adapter}: no adapter file (nor a run directory with best.safetensors)")
    check_export_output(out_dir, [best])
    trained, meta = read_tensors(best)
    if meta.get("format") == ADAPTER_FORMAT:
        return export_peft(best, out_dir, base_name)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("method") != "merge":
        raise UsageError(f"{best} is a {meta.get('method') or meta.get('format')!r} checkpoint: only adapter files "
                         "and LoRA/merge runs have one LoRA adapter (export an X-Cross run's sources instead)")
    # A merge run is rebuilt from its sources: none may be written over either, and the base is loaded only once
    # the output is known to be writable.
    check_export_output(out_dir, [best, best.parent / "config.json",
                                  *(f for p in meta["adapters"] for f in adapter_files(p))])
    config = RunConfig.from_dict(json.loads((best.parent / "config.json").read_text()))
    decoder = load_decoder(model_dir or config.model.model_dir)
    model = model_for(config, decoder, [Path(p) for p in meta["adapters"]])
    load_trained(model, trained)
    return export_peft(model, out_dir, base_name)


def import_(args: argparse.Namespace) -> str:
    """`xcross-peft import`: check the adapter against the base, give it a head (kept, fresh or trained), write it."""
    peft_dir, out_file = Path(args.peft_dir), Path(args.out_file)
    model_dir = Path(args.model_dir).expanduser()
    # Before any work: the output may not be (a link to) the adapter's files or the base's, all of which are read.
    check_import_output(out_file, [*adapter_files(peft_dir), *(model_dir.iterdir() if model_dir.is_dir() else ())])
    _, head, meta = read_peft_adapter(peft_dir, args.model_dir)  # refuses settings and another base's name
    keep = bool(head) and args.head == "keep"
    head_init = "sources" if keep else "fresh"
    extra = {"peft": meta["peft"]}
    if args.train_head_on is None:
        torch.manual_seed(getattr(args, "train.seed") or 0)  # a fresh head's dense layer is random
        # build_model checks the shapes against the base (check_adapter)
        model = build_model(args.model_dir, "source" if keep else "merge", [peft_dir], head_init=head_init)
        save_adapter(model, out_file, {**{k: v for k, v in meta.items() if k == "domain"}, **extra})
        how = "its exported head" if keep else "a fresh head (scores every candidate equally)"
        hint = "" if keep else "; train one with --train-head-on DOMAIN"
        return f"wrote {out_file}: {meta['lora']['targets']} rank {meta['lora']['rank']}, {how}{hint}"
    model, results = train_head(args, peft_dir, LoRAConfig.from_dict(meta["lora"]), head_init)
    save_adapter(model, out_file, {"domain": args.train_head_on, **extra})
    best = ", ".join(f"{k} {v:.4f}" for k, v in results["training"]["best_valid"].items())
    return f"wrote {out_file}: the adapter with a head trained on {args.train_head_on} (validation {best})"


def train_head(args: argparse.Namespace, peft_dir: Path, lora: LoRAConfig, head_init: str):
    """The head alone trained on `--train-head-on` over the frozen adapter: a "merge" run of one adapter (the
    mean of one delta is that delta), model-selected on validation. Returns (the selected model, its results)."""
    with tempfile.TemporaryDirectory(prefix="xcross-peft-") as scratch:
        given = {"target": args.train_head_on, "method": "lora", "out": args.out or scratch, "train_sources": False,
                 "model.model_dir": args.model_dir, **given_flags(args)}
        config = resolve(RunConfig.from_dict({}).with_values(given))
        config = config.with_values({"model.lora": lora, "model.head_init": head_init})
        bootstrap(config)
        # Validated as the LoRA run it stands in for: a merge run would ask for source domains of the data, but
        # its one adapter is the imported one.
        config = replace(prepare(config), method="merge", sources=())
        decoder = load_decoder(config.model.model_dir, *place(config))
        results = train_method(config, decoder, [peft_dir], progress=not args.quiet, test=False)
        model = model_for(config, decoder, [peft_dir])
        load_trained(model, load_tensors(RunDir.of(config).best)[0])
    return model, results


if __name__ == "__main__":
    sys.exit(main())
