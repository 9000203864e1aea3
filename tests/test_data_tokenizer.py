"""Tests of the title tokenizer (tigerfg_jax/data/tokenizer.py)."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from tigerfg_jax.data.tokenizer import TitleTokenizer, build_tokenizer

TITLES = ["red round handbag with white stripes", "blue shirt", "green mug with black dots",
          "red square box", "yellow hat with red checks"]


@pytest.fixture(scope="module")
def trained():
  return TitleTokenizer.train(TITLES, vocab_size=200)


def test_special_tokens_and_words(trained):
  vocab = trained.tokenizer.get_vocab()
  assert [vocab[t] for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [0, 1, 2, 3]
  assert (trained.bos_id, trained.eos_id) == (1, 2)
  assert 5 < trained.vocab_size <= 200
  tokens, mask = trained.encode(["Red SHIRT"], max_len=6)
  words = [trained.tokenizer.id_to_token(int(t)) for t in tokens[0, 1:3]]
  assert words == ["red", "shirt"]
  np.testing.assert_array_equal(tokens[0], [1, vocab["red"], vocab["shirt"], 2, 0, 0])
  np.testing.assert_array_equal(mask[0], [True] * 4 + [False] * 2)
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_padding_and_truncation_keep_eos(trained):
  tokens, mask = trained.encode(["blue shirt", TITLES[0]], max_len=5)
  assert tokens.shape == (2, 5) and mask.shape == (2, 5)
  assert mask[0].tolist() == [True, True, True, True, False] and tokens[0, 4] == 0
  assert mask[1].all() and tokens[1, 0] == 1 and tokens[1, -1] == 2
  full, _ = trained.encode([TITLES[0]], max_len=16)
  np.testing.assert_array_equal(tokens[1, 1:4], full[0, 1:4])
  with pytest.raises(ValueError, match="BOS and EOS"):
    trained.encode(["x"], max_len=1)


def test_save_load_round_trip(trained, tmp_path):
  path = str(tmp_path / "tokenizer.json")
  trained.save(path)
  loaded = TitleTokenizer.load(path)
  assert loaded.vocab_size == trained.vocab_size
  for a, b in zip(trained.encode(TITLES + ["unseen words"], 12),
                  loaded.encode(TITLES + ["unseen words"], 12)):
    np.testing.assert_array_equal(a, b)


def test_plain_vocab_file(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "mug", "##s"]) + "\n")
  tok = TitleTokenizer.load(str(path))
  tokens, mask = tok.encode(["Red mugs tea"], max_len=7)
  np.testing.assert_array_equal(tokens[0], [2, 4, 5, 6, 1, 3, 0])
  assert mask[0].sum() == 6
  bad = tmp_path / "bad.txt"
  bad.write_text("red\nmug\n")
  with pytest.raises(ValueError, match="unknown token"):
    TitleTokenizer.load(str(bad))


def test_user_tokenizer_json_with_clip_style_names(tmp_path):
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "r": 2, "e": 3, "d": 4, "re": 5, "red": 6}
  hf = tokenizers.Tokenizer(models.BPE(vocab, [("r", "e"), ("re", "d")]))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  path = str(tmp_path / "clip.json")
  hf.save(path)
  tok = TitleTokenizer.load(path)
  tokens, mask = tok.encode(["red"], max_len=4)
  np.testing.assert_array_equal(tokens[0], [0, 6, 1, 0])
  assert mask[0].tolist() == [True, True, True, False]
  del vocab["<|endoftext|>"]
  hf = tokenizers.Tokenizer(models.BPE({**vocab, "x": 1}, [("r", "e"), ("re", "d")]))
  hf.save(path)
  with pytest.raises(ValueError, match="end token"):
    TitleTokenizer.load(path)


def test_build_tokenizer_trains_or_loads(trained, tmp_path):
  config = ml_collections.ConfigDict(dict(tokenizer=None, vocab_size=200))
  built = build_tokenizer(config, TITLES)
  assert built.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
  path = str(tmp_path / "t.json")
  trained.save(path)
  config.tokenizer = path
  assert build_tokenizer(config, ["other titles"]).vocab_size == trained.vocab_size
