"""Text to token ids for a model directory: a thin wrapper over its `tokenizer.json` (HF `tokenizers`) that
also knows the model's bos/eos/pad ids, read from the directory's JSON configs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

# Looked up in this order; the tokenizer's own config names tokens as strings and wins, since the model
# config of some families (Qwen2) lists a bos id that their tokenizer never adds.
CONFIG_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")
SPECIAL = ("bos", "eos", "pad")


class Tokenizer:
    """Encodes text to the raw ids of a model's vocabulary and back.

    `encode` adds no special tokens unless asked for a leading bos: xcross tokenises every title on its own
    and concatenates the ids, so nothing may be inserted between them.

        tok = Tokenizer.from_dir("~/.cache/xcross/models/gemma-3-270m")
        ids = tok.encode("LEGO City Fire Truck", add_bos=True)   # [2, ...]
        tok.decode(ids)                                           # "LEGO City Fire Truck"
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        self.backend = backend
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `model_dir/tokenizer.json` and the special ids from `model_dir`'s configs (see `CONFIG_FILES`)."""
        model_dir = Path(model_dir).expanduser()
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs a tokenizer.json "
                                    "(for the default Gemma 3 270M, run `xcross-prepare gemma`)")
        backend = tokenizers.Tokenizer.from_file(str(path))
        configs = [_read_json(model_dir / name) for name in CONFIG_FILES]
        return cls(backend, **{f"{kind}_id": _special_id(kind, configs, backend) for kind in SPECIAL})

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`, preceded by `bos_id` if `add_bos` (an error for a tokenizer without a bos token)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self._require_bos(), *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, on all cores."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self._require_bos()] if add_bos else []
        return [prefix + encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or None for tokenizers without one (Qwen2)."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id (the first, where a config lists several)."""
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        """The padding id; `eos_id` for models that define none (Llama 3), as padding is always masked."""
        return self._pad_id if self._pad_id is not None else self._eos_id

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary, added tokens included; the model's embedding may have more rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _require_bos(self) -> int:
        if self._bos_id is None:
            raise ValueError("this tokenizer has no bos token (bos_id is None); encode with add_bos=False")
        return self._bos_id

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_id(kind: str, configs: list[dict], backend: tokenizers.Tokenizer) -> int | None:
    """The first config that mentions the token decides, even when it says null."""
    for config in configs:
        if f"{kind}_token_id" in config:
            value = config[f"{kind}_token_id"]
            if isinstance(value, list):  # several eos ids (Llama 3.1 instruct): the first is the main one
                value = value[0] if value else None
            return value
        if f"{kind}_token" in config:
            token = config[f"{kind}_token"]
            if isinstance(token, dict):  # an AddedToken, serialised
                token = token.get("content")
            if token is None:
                return None
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the configured {kind}_token {token!r} is not in the tokenizer's vocabulary")
            return token_id
    return None
