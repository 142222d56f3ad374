"""PEFT LoRA adapter directories in and out: one is read as an xcross source adapter, and any one-stream xcross
adapter is written as one that `peft.PeftModel.from_pretrained` loads, with the xcross scoring head beside it.

PEFT's format is read and written with safetensors and json only; `peft` itself is a test reference, never imported.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from .files import remove_stale_temporaries
from .lora import DEFAULT_TARGETS, LoRAConfig, adapter_tensors, base_signature, read_adapter_file
from .weights import load_tensors, read_safetensors, save_tensors
from .xcross import XCrossModel, head_tensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# The scoring head of an exported adapter, beside PEFT's files: keys `dense.weight` (d, d), `dense.bias` (d,),
# `out.weight` (1, d), `out.bias` (1,), all fp32; its JSON metadata (under "config") has HEAD_FORMAT, the formula,
# the adapter's LoRA settings and the base signature.
HEAD_FILE = "xcross_head.safetensors"
EXPORTED = (PEFT_CONFIG, PEFT_WEIGHTS, HEAD_FILE)  # every file `export_peft` writes, and no other
HEAD_FORMAT = "xcross-head/1"
SCORE_FORMULA = ("score = out.weight @ tanh(dense.weight @ h + dense.bias) + out.bias, h: the final-normed hidden "
                 "state (transformers' hidden_states[-1]) at a candidate's last token")
PEFT_FORMAT = "peft-lora"  # the "format" of the config `read_peft_adapter` returns
KEY_PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names

# PEFT settings under which an adapter is no longer plain LoRA (`y = W x + s B A x` on the listed linears); each
# must hold its plain value (None, False, or empty when absent), else the adapter is refused by name.
NOT_PLAIN = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "fan_in_fan_out",
             "lora_bias", "use_qalora", "trainable_token_indices", "target_parameters", "layer_replication",
             "megatron_config", "alora_invocation_tokens", "use_bdlora", "arrow_config", "monteclora_config",
             "kasa_config", "velora_config")
# Initialisations that also rewrite the base weights (W - s B A): the adapter belongs to that rewritten base.
# PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` turns such an adapter into plain LoRA.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# The settings read as numbers, with what each must be; a string ("8") is refused rather than converted, as PEFT's
# own LoraConfig would not have written it.
NUMBERS = {"r": ("a positive integer", lambda v: type(v) is int and v > 0),
           "lora_alpha": ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v)),
           "lora_dropout": ("a number from 0 to 1, or null", lambda v: v is None or (type(v) in (int, float)
                                                                                    and 0 <= v <= 1)),
           "use_rslora": ("true or false", lambda v: type(v) is bool)}
REQUIRED = ("r", "lora_alpha")


def is_peft_directory(path: str | Path) -> bool:
    """Whether `path` is a PEFT LoRA directory (it holds adapter_config.json) rather than an adapter file."""
    return (Path(path) / PEFT_CONFIG).is_file()


def adapter_files(path: str | Path) -> list[Path]:
    """The files that reading the adapter at `path` reads: a PEFT directory's three, or the adapter file itself."""
    path = Path(path)
    return [path / PEFT_CONFIG, path / PEFT_WEIGHTS, path / HEAD_FILE] if is_peft_directory(path) else [path]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or directory, however spelt: another path, a symlink, a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is absent: nothing there to write over
        return False


def _unwritable(out: Path, target: Path) -> str | None:
    """Why `out` cannot be created or replaced in the directory `target` (or under its nearest existing parent).
    Checked up front so that a run is refused before its work, not after it, with the directory named rather than a
    temporary file's name."""
    while not target.exists() and not target.is_symlink():
        target = target.parent
    if not target.is_dir():
        return f"{target} is not a directory, so {out} cannot be written; choose another output"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} is not writable, so {out} cannot be written; choose another output"
    return None


def check_import_output(out_file: str | Path, reads: Iterable[str | Path]) -> None:
    """Refuse, before any work, an adapter file to write that is one of the files `reads` (so writing it would
    replace an input) or that cannot be written."""
    out_file = Path(out_file).absolute()
    if out_file.is_dir():
        raise ValueError(f"{out_file} is a directory; name the adapter file to write (.safetensors)")
    for path in reads:
        if _same_file(out_file, Path(path)):
            raise ValueError(f"the output {out_file} is the input {path}, which this command reads; choose another "
                             "output file")
    if why := _unwritable(out_file, out_file.parent):
        raise ValueError(why)


def check_export_output(out_dir: str | Path, reads: Iterable[str | Path]) -> None:
    """Refuse, before any work, a directory to export into that is, or holds, one of the files `reads` (under any
    spelling: export writes its own files there, and an input is never among them), that cannot be written, or that
    is a non-empty directory other than a PEFT adapter's (FileExistsError)."""
    out_dir = Path(out_dir).absolute()
    for path in map(Path, reads):
        holders = [path, *path.absolute().parents, *Path(os.path.realpath(path)).parents]
        if any(_same_file(out_dir, p) for p in holders) or any(_same_file(out_dir / n, path) for n in EXPORTED):
            raise ValueError(f"the output directory {out_dir} is or holds the input {path}, which this command "
                             "reads; choose an output directory apart from the inputs")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose another output directory")
    if out_dir.is_dir() and not is_peft_directory(out_dir) and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a PEFT adapter directory; export writes only into an "
                              "empty or a PEFT adapter directory")
    if why := _unwritable(out_dir, out_dir):
        raise ValueError(why)


def _read(path: Path, reader: Callable):
    """`reader(path)`, with a file safetensors cannot parse (truncated, or not safetensors at all) or whose xcross
    metadata is not JSON refused as a bad input that names the file, rather than as safetensors' own error."""
    try:
        return reader(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a complete safetensors file ({err}); was it truncated?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its xcross metadata is not valid JSON ({err})") from None


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """`weights.load_tensors`, with a file that is not whole safetensors refused by name, as a bad input."""
    return _read(Path(path), load_tensors)


def _check_finite(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """A NaN or infinity in an adapter's weights makes every score NaN; refuse it where it is read, by name."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path} has non-finite values in {key}")


def _read_peft_config(path: Path) -> dict:
    """adapter_config.json, refused with the file and the key (or the JSON error's position) named."""
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:  # malformed JSON, or text that is not UTF-8
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(config).__name__})")
    check_peft_config(path.parent, config)
    for key in REQUIRED:
        if key not in config:
            raise ValueError(f"{path} has no {key!r}: a LoRA adapter config records its rank r and lora_alpha")
    for key, (what, valid) in NUMBERS.items():
        if key in config and not valid(config[key]):
            raise ValueError(f"{path}: {key} must be {what}, not {json.dumps(config[key])}")
    return config


def _is_plain(value) -> bool:
    return value is None or value is False or (isinstance(value, (list, tuple, dict, str)) and not value)


def base_name(model_dir: str | Path) -> str | None:
    """The name a base model directory records for itself: `_name_or_path` of its config.json (transformers 4
    wrote it; 5 does not), or None."""
    path = Path(model_dir).expanduser() / "config.json"
    name = json.loads(path.read_text()).get("_name_or_path") if path.is_file() else None
    return name or None


def check_peft_config(path: str | Path, config: dict) -> None:
    """Refuse, naming the setting, a PEFT adapter config that is not plain LoRA on xcross's target linears."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; xcross reads LORA adapters")
    refused = [f"{k}={config[k]!r}" for k in NOT_PLAIN if not _is_plain(config.get(k))]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights; re-save the adapter with "
                       "path_initial_model_for_weight_conversion to make it plain LoRA)")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)) and (outside := sorted(set(targets) - set(DEFAULT_TARGETS))):
        refused.append(f"target_modules {outside} (xcross adapts only {', '.join(DEFAULT_TARGETS)})")
    if refused:
        raise ValueError(f"{path}: PEFT settings xcross does not support: {'; '.join(refused)}")


def read_peft_adapter(path: str | Path, model_dir: str | Path | None = None
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(adapter tensors, head tensors, config) of a PEFT LoRA directory, as `methods.read_adapter` gives them.

    The adapter's targets are the linears its weights are for (any subset of q/k/v/o/gate/up/down_proj). rsLoRA's
    scaling alpha / sqrt(r) becomes alpha' = alpha · sqrt(r), so that xcross's alpha' / r is the same. A PEFT
    adapter has no scoring head: the head tensors are empty, unless the directory was written by `export_peft`
    (its `xcross_head.safetensors`, whose base signature then goes into the config for `check_adapter`). With
    `model_dir`, PEFT's `base_model_name_or_path` must equal, as a string, the name that directory records
    (`base_name`), where both have one; shapes are checked against a decoder by `lora.check_adapter`.
    """
    path = Path(path)
    config_path, weights_path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: no {PEFT_CONFIG}")
    if not weights_path.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise FileNotFoundError(f"{path} has no {PEFT_WEIGHTS} (found: {found}); xcross reads only safetensors: "
                                "re-save the adapter with save_pretrained(..., safe_serialization=True)")
    peft = _read_peft_config(config_path)
    name = peft.get("base_model_name_or_path") or None
    if model_dir is not None and name is not None and (own := base_name(model_dir)) is not None and own != name:
        raise ValueError(f"{path} is an adapter for base {name!r} (base_model_name_or_path in {PEFT_CONFIG}), but "
                         f"{model_dir} is {own!r} (_name_or_path in its config.json)")

    raw, _ = _read(weights_path, lambda p: read_safetensors(p, dtype=torch.float32))
    _check_finite(weights_path, raw)
    adapter, unexpected = {}, []
    for key, tensor in raw.items():
        module, _, part = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
        if not key.startswith(KEY_PREFIX) or part not in ("A.weight", "B.weight") or \
                module.rsplit(".", 1)[-1] not in DEFAULT_TARGETS:
            unexpected.append(key)
            continue
        adapter[f"{module}.lora_{part[0]}"] = tensor
    if unexpected or not adapter:
        raise ValueError(f"{weights_path}: tensors that are not LoRA A/B weights of {', '.join(DEFAULT_TARGETS)}: "
                         f"{sorted(unexpected)[:3] or 'none at all'}")
    rank = peft["r"]
    if ranks := sorted({t.shape[0] for k, t in adapter.items() if k.endswith("lora_A")} - {rank}):
        raise ValueError(f"{weights_path}: lora_A of rank {ranks} but {PEFT_CONFIG} says r = {rank}")
    used = {k.rsplit(".", 2)[-2] for k in adapter}
    alpha = float(peft["lora_alpha"])
    rslora = bool(peft.get("use_rslora", False))
    lora = LoRAConfig(rank=rank, alpha=alpha * math.sqrt(rank) if rslora else alpha,
                      dropout=float(peft.get("lora_dropout") or 0.0),
                      targets=tuple(t for t in DEFAULT_TARGETS if t in used))

    head, extra = {}, {"base": None}
    if (path / HEAD_FILE).is_file():
        tensors, meta = _read(path / HEAD_FILE, load_tensors)
        _check_finite(path / HEAD_FILE, tensors)
        head = {f"head.{k}": v for k, v in tensors.items()}
        extra = {k: v for k, v in meta.items() if k not in ("format", "score", "lora")}
        extra.setdefault("base", None)
    source = {"path": str(path), "base_model_name_or_path": name, "r": rank, "lora_alpha": peft["lora_alpha"],
              "use_rslora": rslora, "target_modules": peft.get("target_modules"), "task_type": peft.get("task_type")}
    return adapter, head, {"format": PEFT_FORMAT, "lora": lora.to_dict(), **extra, "peft": source}


def export_peft(adapter: str | Path | XCrossModel, out_dir: str | Path,
                base_model_name_or_path: str | None = None) -> Path:
    """Write an xcross adapter as a PEFT LoRA directory: adapter_config.json, adapter_model.safetensors and the
    scoring head as `xcross_head.safetensors` (see HEAD_FILE). Into an existing PEFT directory only these files are
    written, each replaced whole, and only once all three are written (`_replace_files`); its other files (the
    README.md model card PEFT writes, anything else) are kept. Any other non-empty directory is refused.

    `adapter`: an adapter file (a source's, a LoRA run's best.safetensors, or anything `read_adapter` reads), or a
    one-stream LoRA `XCrossModel` (e.g. `build_model(..., "merge", ...)`). `base_model_name_or_path` is recorded for
    PEFT's `AutoPeftModel` (the HF id or path of the base); PEFT's scaling alpha / r equals xcross's.
    """
    check_export_output(out_dir, () if isinstance(adapter, XCrossModel) else adapter_files(adapter))
    if isinstance(adapter, XCrossModel):
        if adapter.n_streams != 1 or adapter.lora is None:
            raise ValueError(f"PEFT holds one LoRA adapter; this model has {adapter.n_streams} stream(s) and "
                             f"{'no' if adapter.lora is None else 'LoRA'} adapters: export a one-stream LoRA model")
        tensors, head, lora = adapter_tensors(adapter.decoder, 0), head_tensors(adapter), adapter.lora
        extra = {"base": base_signature(adapter.decoder)}
        source = "the model"
    else:
        source = adapter
        if is_peft_directory(adapter):
            tensors, head, config = read_peft_adapter(adapter)
        else:
            tensors, head, config = _read(Path(adapter), read_adapter_file)
        lora = LoRAConfig.from_dict(config["lora"])
        extra = {k: v for k, v in config.items() if k not in ("format", "lora", "peft")}
    _check_finite(source, {**tensors, **head})  # PEFT would load a NaN adapter without a word
    out_dir = Path(out_dir)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    peft = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": alpha, "target_modules": sorted(lora.targets), "lora_dropout": lora.dropout,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }
    weights = {f"{KEY_PREFIX}{k}.weight": v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    writers = {PEFT_WEIGHTS: lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"})}
    if head:
        writers[HEAD_FILE] = lambda tmp: save_tensors(
            tmp, {k.removeprefix("head."): v.float() for k, v in head.items()},
            {"format": HEAD_FORMAT, "score": SCORE_FORMULA, "lora": lora.to_dict(), **extra})
    writers[PEFT_CONFIG] = lambda tmp: tmp.write_text(json.dumps(peft, indent=2) + "\n")
    # Without a head this time, an earlier export's head would be read as this adapter's.
    _replace_files(out_dir, writers, remove=() if head else (HEAD_FILE,))
    return out_dir


def _replace_files(directory: Path, writers: dict[str, Callable[[Path], None]], remove: Iterable[str] = ()) -> None:
    """Write each file of `writers` (name -> a function that writes the file at the path it is given) to a
    temporary beside it, then delete `remove` and rename the temporaries into place, in `writers`' order.

    Every file is written before any is replaced, so a failure while writing (a full disk) leaves the directory as
    it was, and a reader never sees half of a file; files of other names are never touched. The config comes last:
    its presence is what makes a directory a PEFT adapter's, so a new directory is one only once it is complete.
    """
    created = []
    parent = directory
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    directory.mkdir(parents=True, exist_ok=True)
    temporaries = []
    try:
        for name, write in writers.items():
            remove_stale_temporaries(directory / name)  # what a killed export left (SIGKILL runs no cleanup)
            tmp = directory / f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temporaries.append((tmp, directory / name))
            mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask: the mode a plain open() gives
            os.close(fd)
            write(tmp)
            # safetensors writes through a private (0600) temporary of its own that replaces ours: give the file
            # the mode its neighbours have, as results are read by other users of a shared machine.
            tmp.chmod(mode)
        for name in remove:
            (directory / name).unlink(missing_ok=True)
        for tmp, dest in temporaries:
            os.replace(tmp, dest)
    except BaseException:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
        for path in created:  # deepest first; nothing this call made is left behind
            try:
                path.rmdir()
            except OSError:
                break
        raise
