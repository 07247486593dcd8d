"""WordPiece training: fixed special ids, casing, files on disk, transformers parity."""

import json
import random

import pytest

from bertforge.data.tokenizer import (
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
    train_tokenizer,
)
from bertforge.errors import BertforgeError

WORDS = (
    "the a of and to in is was for on with as by at from that this it his her they river "
    "mountain village city castle garden history music painting science language winter "
    "summer railway station university library museum bridge harbour forest ancient northern "
    "southern famous small large early later built opened founded played wrote studied "
    "visited described named became remained"
).split()


def english_like(n_docs=40, seed=0):
    """A few KB of deterministic sentence-like text, a paragraph per document."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.append(str(rng.randint(1800, 2020)))
            sentences.append(" ".join(words) + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(english_like()) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([str(corpus_file)], out, vocab_size=300, show_progress=False)


def test_files_written_and_special_ids_fixed(tok_dir):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    tok = load_tokenizer(tok_dir)
    assert special_token_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    vocab = (tok_dir / "vocab.txt").read_text().splitlines()
    assert len(vocab) == tok.get_vocab_size()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert all(tok.token_to_id(t) == i for i, t in enumerate(vocab))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["model_max_length"] == 512


def test_template_and_lowercasing(tok_dir):
    tok = load_tokenizer(tok_dir)
    enc = tok.encode("The River", "a Castle")
    assert enc.tokens == ["[CLS]", "the", "river", "[SEP]", "a", "castle", "[SEP]"]
    assert enc.type_ids == [0, 0, 0, 0, 1, 1, 1]
    assert tok.encode("The River").ids == tok.encode("the river").ids


def test_cased_tokenizer_keeps_case(corpus_file, tmp_path):
    out = train_tokenizer(
        [str(corpus_file)], tmp_path, vocab_size=300, lowercase=False, show_progress=False
    )
    tok = load_tokenizer(out)
    assert tok.encode("The", add_special_tokens=False).tokens[0].startswith("Th")
    assert tok.encode("The").ids != tok.encode("the").ids
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is False


@pytest.mark.parametrize("lowercase", [True, False])
def test_transformers_autotokenizer_encodes_identically(corpus_file, tmp_path, lowercase):
    transformers = pytest.importorskip("transformers")
    out = train_tokenizer(
        [str(corpus_file)], tmp_path, vocab_size=300, lowercase=lowercase, show_progress=False
    )
    ours = load_tokenizer(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    singles = [
        "The ancient Castle was built in 1850.",
        "Zürich's café — naïve façade!",
        "unseen xylophone words [MASK] here",
        "东京 river  \t tabs",
    ]
    for text in singles:
        assert hf(text)["input_ids"] == ours.encode(text).ids, text
    pairs = [("Who built the bridge?", "The village did, in 1901."), ("a", "b c")]
    for a, b in pairs:
        got = hf(a, b)
        enc = ours.encode(a, b)
        assert got["input_ids"] == enc.ids
        assert got["token_type_ids"] == enc.type_ids
    assert hf.pad_token_id == 0 and hf.mask_token_id == 4 and hf.model_max_length == 512


def test_hash_is_of_tokenizer_json(tok_dir, tmp_path):
    h = tokenizer_hash(tok_dir)
    assert len(h) == 16 and h == tokenizer_hash(tok_dir / "tokenizer.json")


def test_empty_corpus_and_missing_dir_raise(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BertforgeError, match="no documents"):
        train_tokenizer([str(empty)], tmp_path / "out", show_progress=False)
    with pytest.raises(BertforgeError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(BertforgeError, match="not found"):
        train_tokenizer([str(tmp_path / "nope.txt")], tmp_path / "out", show_progress=False)
