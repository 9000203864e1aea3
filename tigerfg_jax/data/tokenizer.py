"""Offline title tokenizer (Hugging Face `tokenizers`).

Either a lower-cased BPE vocabulary trained on the training titles (special tokens
[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3) or a user-supplied vocabulary: a Hugging
Face `tokenizer.json` (e.g. CLIP's BPE) or a plain one-token-per-line WordPiece vocab
(e.g. BERT's vocab.txt). Titles encode as BOS title EOS then 0 padding.

BPE rather than WordPiece for the trained vocabulary: `tokenizers`' WordPiece trainer
breaks ties in a different order on every call (other tokens, other ids for the same
titles), its BPE trainer does not, and a run must be reproducible from its seed.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import tokenizers
from etils import epath
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

FILE_NAME = "tokenizer.json"  # a saved tokenizer's name in run and export folders.

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
# Names under which common vocabularies spell their begin / end / unknown tokens.
_BOS_NAMES = ("[BOS]", "[CLS]", "<s>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("[EOS]", "[SEP]", "</s>", "<|endoftext|>", "<eos>")
_UNK_NAMES = ("[UNK]", "<unk>", "<|unk|>")


def _lower_cased(model: models.Model) -> tokenizers.Tokenizer:
  """`model` behind BERT's lower-casing normaliser and whitespace/punctuation split."""
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  return tokenizer


def _find(tokenizer: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
  for name in names:
    token_id = tokenizer.token_to_id(name)
    if token_id is not None:
      return token_id
  return None


class TitleTokenizer:
  """Encodes titles to int32 token ids with BOS / EOS and a padding mask."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "trained"):
    self.tokenizer = tokenizer
    self.bos_id = _find(tokenizer, _BOS_NAMES)
    self.eos_id = _find(tokenizer, _EOS_NAMES)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"{source}: the vocabulary needs a begin token (one of {_BOS_NAMES}) "
                       f"and an end token (one of {_EOS_NAMES})")

  @classmethod
  def train(cls, titles: Sequence[str], vocab_size: int) -> TitleTokenizer:
    """A BPE vocabulary of at most `vocab_size` tokens learnt from `titles`."""
    tokenizer = _lower_cased(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(titles, trainer)
    return cls(tokenizer)

  @classmethod
  def load(cls, path: epath.PathLike) -> TitleTokenizer:
    """From a tokenizer.json (as `save` writes) or a one-token-per-line vocab file."""
    try:
      text = epath.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: cannot read the tokenizer file as UTF-8 text: {e}") from e
    try:
      is_json = isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
      is_json = False
    if is_json:
      try:
        return cls(tokenizers.Tokenizer.from_str(text), path)
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON models.
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json: {e}") from e
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(tokens)) != len(tokens):
      raise ValueError(f"{path}: a plain vocabulary must list each token once")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = next((name for name in _UNK_NAMES if name in vocab), None)
    if unk is None:
      raise ValueError(f"{path}: a plain vocabulary needs an unknown token (one of {_UNK_NAMES})")
    tokenizer = _lower_cased(models.WordPiece(vocab, unk_token=unk))
    tokenizer.decoder = decoders.WordPiece()
    return cls(tokenizer, path)

  def save(self, path: epath.PathLike) -> None:
    """Writes tokenizer.json (a local path or a gs:// URL)."""
    epath.Path(path).write_text(self.tokenizer.to_str(pretty=True), encoding="utf-8")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, titles: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, max_len], mask bool [B, max_len]) of BOS title EOS, 0-padded.

    Titles too long are cut so that EOS stays last.
    """
    if max_len < 2:
      raise ValueError(f"max_len must leave room for BOS and EOS, got {max_len}")
    tokens = np.zeros((len(titles), max_len), np.int32)
    mask = np.zeros((len(titles), max_len), bool)
    for row, encoding in enumerate(self.tokenizer.encode_batch(list(titles),
                                                               add_special_tokens=False)):
      ids = [self.bos_id, *encoding.ids[:max_len - 2], self.eos_id]
      tokens[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    return tokens, mask


def build_tokenizer(data_config, train_titles: Sequence[str]) -> TitleTokenizer:
  """The run's tokenizer: `data_config.tokenizer` if set, else trained on the titles."""
  if data_config.tokenizer:
    return TitleTokenizer.load(data_config.tokenizer)
  return TitleTokenizer.train(train_titles, data_config.vocab_size)
