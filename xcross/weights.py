"""Loading and saving weights: base checkpoints (`*.safetensors`, sharded too) and trained parts with their config.

Loading is a strict `load_state_dict` onto a model built on the meta device; saving is atomic (temp file, rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import load_config
from .files import atomic_write
from .model import Decoder


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, else every `*.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir}; for the default Gemma 3 270M run `xcross-prepare gemma`"
        )
    return files


def read_safetensors(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of one file, each tensor cast to `dtype` as it is read to keep peak memory low."""
    tensors = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return tensors, metadata


def load_decoder(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Decoder:
    """Build the decoder of `model_dir/config.json` on the meta device and load its weights strictly."""
    model_dir = Path(model_dir).expanduser()
    config = load_config(model_dir)
    with torch.device("meta"):
        model = Decoder(config)
    state = {}
    for path in checkpoint_files(model_dir):
        state.update(read_safetensors(path, device, dtype)[0])
    if config.tie_word_embeddings:
        # Some exporters write the tied head anyway; it is the embedding matrix by definition.
        state.pop("lm_head.weight", None)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} does not match its config.json: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        want = expected[key].shape
        if tensor.shape != want:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(want)}")
    model.load_state_dict(state, strict=True, assign=True)
    model.fingerprint = base_fingerprint(model_dir)
    return model.eval().requires_grad_(False)


def base_fingerprint(model_dir: str | Path, blocks: int = 256, block_size: int = 4096) -> str:
    """A short identity of a checkpoint's weights, independent of the dtype it is loaded in: sha256 over every
    safetensors file's header and `blocks` evenly spaced blocks of its raw bytes (~1 MB read however large the
    file). Two bases of the same shapes (another conversion, the instruction-tuned variant, another random seed)
    differ in it."""
    digest = hashlib.sha256()
    for path in checkpoint_files(model_dir):
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(8)
            digest.update(header + f.read(int.from_bytes(header, "little")))
            for k in range(blocks):
                f.seek(size * k // blocks)
                digest.update(f.read(block_size))
    return digest.hexdigest()[:16]


def is_whole(path: str | Path) -> bool:
    """Whether a safetensors file is complete: its header reads and its data reaches the end the header declares
    (a copy or a write cut short keeps a valid header over missing data)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Save tensors as safetensors with `config` as JSON metadata under the key "config", atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt", "config": json.dumps(config, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from a file written by `save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    tensors, metadata = read_safetensors(path, device)
    if "config" not in metadata:
        raise ValueError(f"{path} has no xcross config in its metadata; was it written by xcross?")
    return tensors, json.loads(metadata["config"])
