"""xcross.tokenizer against transformers' tokenizer for the same GGUF (real product titles and edge cases),
and the special-id lookup for other HF-layout model directories."""

import csv
import json
import random

import pytest
import tokenizers

from xcross.tokenizer import Tokenizer

EDGE_CASES = [
    "", " ", "  ", "   ", "a", "  leading spaces", "trailing spaces   ", "repeated   inner    spaces", " x ",
    "\n", "\n\n", "\n\n\n\n", "line one\nline two", "para\n\npara", "\r\n", "tab\tseparated\tvalues", "\t\t", " \t \n ",
    "0", "1234567890", "3.14159", "2x 12oz (Pack of 24)", "№ 5", "1/2\" x 3/4\"", "99.9%",
    "🚀", "🎉👍🏽", "👨‍👩‍👧‍👦 family", "❤️", "emoji🙂inside", "𝔹𝕠𝕝𝕕",
    "日本語のテキスト", "中文测试 产品", "한국어 제품", "Привет мир", "مرحبا", "ελληνικά", "עברית",
    "▁", "▁▁", "a▁b", " ▁ ", "▁leading",
    "&amp;", "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&quot;quoted&quot; &#39;single&#39;", "&nbsp;",
    "<b>bold</b>", "<table>", "<br/>", "<bos>", "<eos>", "<pad>", "<start_of_turn>user", "<unused0>",
    "[multimodal]", "<0x41>", "<unk>", "<mask>",
    "\x00", "\x01\x02", "zero\u200bwidth", "non\u00a0breaking", "ideographic\u3000space", "e\u0301 vs \u00e9",
    "ﬁ ligature", "ＦＵＬＬＷＩＤＴＨ", "\ufeffbom", "\ud7ff", "Café Déjà Vu", "naïve façade",
    "LEGO® Star Wars™ Set", "Melissa & Doug – Wooden Puzzle", "3-in-1", "C++/C#", "user@example.com",
    "https://www.example.com/path?q=1&r=2", "   ", "a" * 3000, "word " * 2000, "🚀" * 500, "日本" * 1000,
    " ".join(str(i) for i in range(1000)), "x\n" * 500,
]

PIECES = ["Toy", "car", "LEGO", "puzzle", "Doll", "set", "of", "the", "Kids", "3", "42", "2016", "!", "?", ",", ".",
          "-", "'s", "(", ")", "&amp;", "&", "/", " ", "  ", "   ", "\t", "\n", "\u00a0", "é", "ü", "ß", "日本",
          "😀", "👍🏽", "Ω", "▁", "<bos>", "<table>", "[multimodal]", "<unused5>", "<0x41>", "\\", "\"", "™"]


def generated_strings(count: int = 500, seed: int = 0) -> list[str]:
    """Seeded random mixtures of words, spaces, punctuation, scripts and special-token look-alikes."""
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 16))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer(gemma_dir) -> Tokenizer:
    return Tokenizer.from_dir(gemma_dir)


def assert_same_ids(tokenizer, hf_tokenizer, texts, add_bos):
    expected = hf_tokenizer(texts, add_special_tokens=add_bos)["input_ids"]
    batched = tokenizer.encode_batch(texts, add_bos=add_bos)
    mismatches = [(text, ours, ref) for text, ours, ref in zip(texts, batched, expected) if ours != ref]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"
    assert [tokenizer.encode(text, add_bos=add_bos) for text in texts] == batched


@pytest.mark.parametrize("add_bos", [False, True])
def test_edge_cases_match_transformers(tokenizer, hf_gguf_tokenizer, add_bos):
    texts = EDGE_CASES + generated_strings()
    assert len(texts) >= 500
    assert_same_ids(tokenizer, hf_gguf_tokenizer, texts, add_bos)


@pytest.mark.parametrize("add_bos", [False, True])
def test_product_titles_match_transformers(tokenizer, hf_gguf_tokenizer, amazon_dir, add_bos):
    path = amazon_dir / "toys" / "items.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open(newline="", encoding="utf-8") as f:
        titles = [row["title"] for row in csv.DictReader(f)]
    assert len(titles) >= 500
    assert_same_ids(tokenizer, hf_gguf_tokenizer, titles, add_bos)


def test_bos_is_prepended_and_nothing_else_added(tokenizer):
    plain = tokenizer.encode("Wooden train set")
    assert tokenizer.encode("Wooden train set", add_bos=True) == [tokenizer.bos_id, *plain]
    assert tokenizer.encode("") == [] and tokenizer.encode_batch([]) == []
    # Titles are tokenised one by one and concatenated: no special token may appear in between.
    assert tokenizer.bos_id not in plain and tokenizer.eos_id not in plain


@pytest.mark.parametrize("text", ["LEGO City Fire Truck 60002", "  two leading, two trailing  ",
                                  "tabs\tand\nnewlines\n\n", "emoji 🚀👍🏽 and CJK 日本語 and 𝔹",
                                  "Ünïcödé àçcénts", "Tom &amp; Jerry <table>", "\x00 control \x7f"])
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True)) == text
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True), skip_special_tokens=False) == "<bos>" + text


def test_literal_metaspace_decodes_as_space(tokenizer, hf_gguf_tokenizer):
    # "▁" is how the vocabulary spells a space, so a literal one in a title comes back as a space -- in
    # transformers too. Harmless for ranking, but decode is not a perfect inverse.
    ids = tokenizer.encode("a▁b")
    assert tokenizer.decode(ids) == hf_gguf_tokenizer.decode(ids) == "a b"


def test_special_ids_and_vocab_size(tokenizer, hf_gguf_tokenizer, gemma_dir):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        hf_gguf_tokenizer.bos_token_id, hf_gguf_tokenizer.eos_token_id, hf_gguf_tokenizer.pad_token_id)
    config = json.loads((gemma_dir / "config.json").read_text())
    assert tokenizer.vocab_size == len(hf_gguf_tokenizer) == config["vocab_size"] == 262144


# --- other HF-layout directories ---------------------------------------------------------------------------

VOCAB = {"<s>": 0, "</s>": 1, "<pad>": 2, "<|endoftext|>": 3, "hello": 4, "world": 5, "<unk>": 6}


def model_dir(tmp_path, **configs):
    """A directory with a tiny word-level tokenizer.json and the given JSON configs (name without .json)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    for name, content in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def test_llama3_style_ids(tmp_path):
    # No pad token anywhere and a list of eos ids in config.json.
    directory = model_dir(tmp_path, tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"},
                          config={"bos_token_id": 0, "eos_token_id": [1, 3]})
    tok = Tokenizer.from_dir(directory)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.encode("hello world", add_bos=True) == [0, 4, 5]
    assert tok.vocab_size == len(VOCAB)


def test_qwen2_style_ids(tmp_path):
    # The tokenizer config says there is no bos, though config.json names one: the tokenizer wins.
    directory = model_dir(tmp_path, tokenizer_config={"bos_token": None, "eos_token": "<|endoftext|>",
                                                      "pad_token": "<|endoftext|>"},
                          config={"bos_token_id": 0, "eos_token_id": 3})
    tok = Tokenizer.from_dir(directory)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 3, 3)
    assert tok.encode("hello") == [4]
    with pytest.raises(ValueError, match="no bos"):
        tok.encode("hello", add_bos=True)
    with pytest.raises(ValueError, match="no bos"):
        tok.encode_batch(["hello"], add_bos=True)


def test_ids_from_serialised_added_tokens_and_generation_config(tmp_path):
    directory = model_dir(tmp_path, tokenizer_config={"bos_token": {"__type": "AddedToken", "content": "<s>"}},
                          generation_config={"eos_token_id": 1, "pad_token_id": 2})
    tok = Tokenizer.from_dir(directory)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_unknown_configured_token_is_an_error(tmp_path):
    directory = model_dir(tmp_path, tokenizer_config={"bos_token": "<|begin_of_text|>"})
    with pytest.raises(ValueError, match="begin_of_text"):
        Tokenizer.from_dir(directory)


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
