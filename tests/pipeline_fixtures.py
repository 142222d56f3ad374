"""A tiny self-contained setup for end-to-end tests of train.py / evaluate.py: a small synthetic world and a random
tiny Gemma 3 model directory (BPE tokenizer trained on the world's titles), both deterministic by seed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from data_prep.synthetic import WorldConfig, generate_world
from tests.tiny import TINY_GEMMA
from xcross.config import config_from_dict
from xcross.data import PromptTemplate, load_domain
from xcross.model import Decoder
from xcross.weights import read_safetensors

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2 as Gemma's

# 48 items a domain (4 interests of 12): a user buys at most 12, so C = 20 candidates always find 19 negatives, and
# ~100 users a domain keep almost every item through the 5-core filter. Four interests rather than ten give a tiny
# random model few enough clusters to learn in seconds (an interest oracle's MRR is ~0.55, popularity's ~0.3).
TINY_WORLD = dict(users_per_domain=100, items_per_interest=12, max_length=12, domains=("toys", "tools", "sports"),
                  interests=("camping", "cooking", "music", "gardening"))


def make_world(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny synthetic world (processed domains under `out_dir`)."""
    generate_world(out_dir, WorldConfig(seed=seed, **{**TINY_WORLD, **overrides}))
    return out_dir


def world_titles(world_dir: Path) -> list[str]:
    """Every item title of every processed domain, in a fixed order."""
    titles = []
    for items in sorted(world_dir.glob("*/items.jsonl")):
        titles += [json.loads(line)["title"] for line in items.read_text(encoding="utf-8").splitlines()]
    return titles


def train_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A byte-level BPE (any text encodes) with the special tokens first: <pad>=0, <eos>=1, <bos>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def make_model_dir(out_dir: Path, world_dir: Path, seed: int = 0, vocab_size: int = 1000, pretrain: dict | None = None,
                   **config) -> Path:
    """An HF-layout model directory: tokenizer.json trained on the world's titles (and the prompt template),
    a tiny Gemma 3 text config.json and model.safetensors: random weights, or with `pretrain` (keyword arguments
    of `pretrain_on_world`) a base pretrained as a language model on the world's training sequences."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = PromptTemplate()
    tokenizer = train_tokenizer(world_titles(world_dir) + [template.header, template.question], vocab_size)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    raw = {**TINY_GEMMA, "architectures": ["Gemma3ForCausalLM"], "vocab_size": tokenizer.get_vocab_size(),
           "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "rms_norm_eps": 1e-6,
           "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "torch_dtype": "float32",
           **config}
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    torch.manual_seed(seed)
    decoder = Decoder(config_from_dict(raw))
    if pretrain is not None:
        pretrain_on_world(decoder, tokenizer, world_dir, seed=seed, **pretrain)
    state = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


# A small base for the learning tests: 2 global layers of width 64 (wide enough to learn the world in seconds).
SMALL_BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  query_pre_attn_scalar=16, num_hidden_layers=2, layer_types=["full_attention", "full_attention"])


def user_sequences(world_dir: Path) -> list[list[str]]:
    """Each user's training-split titles over every domain of the world (validation and test targets excluded):
    the history and target of the user's last training row in each domain."""
    per_user: dict[str, list[str]] = {}
    for domain_dir in sorted(p.parent for p in world_dir.glob("*/items.jsonl")):
        domain = load_domain(domain_dir)
        last = {e.user_id: [*e.history, e.target] for e in domain.train}
        for user, items in sorted(last.items()):
            per_user.setdefault(user, []).extend(domain.items[i] for i in items)
    return [per_user[u] for u in sorted(per_user)]


def pretrain_on_world(decoder: Decoder, tokenizer, world_dir: Path, steps: int = 300, batch: int = 16,
                      items: int = 6, lr: float = 1e-2, seed: int = 0) -> Decoder:
    """Next-token pretraining of a tiny decoder on users' purchase titles across all domains (a row: `<bos>` and up
    to `items` of one user's titles in random order, one per line), so that the base, like a real pretrained LM,
    knows which products go together across domains before any adapter is trained. Seeded; fp32; in place."""
    rng = np.random.default_rng(seed)
    sequences = user_sequences(world_dir)
    encoded: dict[str, list[int]] = {}

    def encode(title: str) -> list[int]:
        if title not in encoded:
            encoded[title] = tokenizer.encode(title + "\n").ids
        return encoded[title]

    with torch.no_grad():
        decoder.model.embed_tokens.weight.normal_(0, decoder.config.hidden_size ** -0.5)
    decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(0.05 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps))
    for _ in range(steps):
        rows = []
        for u in rng.integers(len(sequences), size=batch):
            seq = sequences[u]
            pick = rng.choice(len(seq), size=min(items, len(seq)), replace=False)
            rows.append([SPECIAL_TOKENS.index("<bos>")] + [t for i in pick for t in encode(seq[i])])
        length = max(map(len, rows))
        ids = torch.zeros(batch, length, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = True
        logits = decoder(ids, attention_mask=mask, logits_at=slice(None)).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return decoder.eval().requires_grad_(False)


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread meanwhile: on this shared 2-core machine two threads can be 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_setup(tmp_path_factory, name: str) -> dict[str, Path]:
    """A module's tiny world and random model: {"root", "world", "model"}."""
    root = tmp_path_factory.mktemp(name)
    world = make_world(root / "world")
    return {"root": root, "world": world, "model": make_model_dir(root / "model", world)}


def one_thread_fixture():
    """A module fixture (autouse) that runs the module's tests on one torch thread: `_one_thread = ...()`."""
    @pytest.fixture(scope="module", autouse=True)
    def _one_thread():
        with one_thread():
            yield
    return _one_thread


def tiny_module(name: str):
    """The fixtures of a module of tiny end-to-end tests: one torch thread, and `setup` (tiny_setup):
    `_one_thread, setup = tiny_module("name")`."""
    @pytest.fixture(scope="module")
    def setup(tmp_path_factory) -> dict[str, Path]:
        return tiny_setup(tmp_path_factory, name)
    return one_thread_fixture(), setup


# -- running the CLIs ------------------------------------------------------------------------------------------------


def cli_env() -> dict:
    """The environment of CLI subprocesses: one intra-op thread each (the machine is shared), no tqdm noise."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def common_flags(world: Path, model: Path, out: Path, **flags) -> list[str]:
    """`--data-dir ... --model-dir ... --out ... --device cpu --dtype float32 --quiet` plus `--key value` flags
    (underscores become dashes; True gives a bare switch)."""
    args = ["--data-dir", str(world), "--model-dir", str(model), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--quiet"]
    for key, value in flags.items():
        if value is False or value is None:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


def run_cli(script: str, args: list[str], timeout: float = 300, launcher: list[str] | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the repository root, captured; `launcher` replaces `python` (torchrun)."""
    command = [*(launcher or [sys.executable]), script, *args]
    return subprocess.run(command, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def interrupt_when(command: list[str], ready, timeout: float = 120, poll: float = 0.05,
                   env: dict | None = None, signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Start `command` (cwd = repository root), send it `signum` (SIGINT) as soon as `ready()` is true, and wait
    for it to finish (stdout and stderr captured)."""
    # As from a terminal: Ctrl-C's default disposition. A test process may run with SIGINT ignored (a pytest-xdist
    # worker can be), and a child inherits that, where Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(command, cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"exited with {proc.returncode} before it could be interrupted:\n{out}\n{err}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not ready after {timeout} s")
            time.sleep(poll)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


# -- reading run outputs ---------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint(run_dir: Path) -> Path:
    """The step directory that `ckpt/LATEST` names."""
    root = run_dir / "ckpt"
    return root / (root / "LATEST").read_text().strip()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference between two tensor dicts with the same keys and shapes."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)
    return worst


# -- trained runs shared by a module's tests -------------------------------------------------------------------------


def train_runs(setup: dict, **flags) -> dict:
    """An X-Cross run (with its two source LoRAs) and a target LoRA run of the tiny world, trained through
    train.py: {"out": the runs directory, "flags": the flags that made them}."""
    out = setup["root"] / "runs"
    args = common_flags(setup["world"], setup["model"], out, **flags)
    for method in ("xcross", "lora"):
        proc = run_cli("train.py", [*args, "--method", method])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"out": out, "flags": args}


def copy_runs(trained: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """`train_runs`' runs copied elsewhere, with the flags that point at the copy (a run is known by content: its
    sources are found beside it)."""
    out = tmp_path / "runs"
    shutil.copytree(trained["out"], out)
    flags = list(trained["flags"])
    flags[flags.index("--out") + 1] = str(out)
    return out, flags
