"""The tokenizer that came with a model, as a seqio vocabulary, and the embedded corpus tokenized with it.

A Hugging Face directory carries its tokenizer as a SentencePiece `tokenizer.model` (read by seqio's own
SentencePieceVocabulary) or a `tokenizer.json` (read here through the `tokenizers` package). `TokenizedCorpusInput`
is the default training input (the embedded corpus) re-tokenized with that vocabulary, so a fine-tune of an
imported model reads text as the model was trained to. Importing this module loads seqio (and TensorFlow).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from axmini.config import REQUIRED, Required
from axmini.interop.errors import ConversionError
from axmini.trainer import corpus
from axmini.trainer.input import SeqioInput, _seqio, register_text_task

seqio = _seqio()  # Before TensorFlow: hides accelerators from it.
import tensorflow as tf  # noqa: E402
import tokenizers  # noqa: E402

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZERS_FILE = "tokenizer.json"


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in (SENTENCEPIECE_FILE, TOKENIZERS_FILE))


def _eos_id(model_dir: Path) -> int | None:
    """The end-of-sequence id of config.json (the first one, where it lists several)."""
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos


class TokenizersVocabulary(seqio.Vocabulary):
    """A Hugging Face `tokenizer.json` as a seqio vocabulary (no special tokens added when encoding)."""

    def __init__(self, path: str, eos_id: int | None):
        self._path = path
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self._eos = eos_id
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> Sequence[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_tf(self, s: Any) -> Any:
        ids = tf.py_function(lambda text: tf.constant(self._encode(text.numpy().decode()), tf.int32), [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: Any) -> Any:
        return tf.py_function(lambda x: self._decode(x.numpy().tolist()), [ids], tf.string)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizersVocabulary) and other._path == self._path

    def __hash__(self) -> int:
        return hash(self._path)


def model_vocabulary(model_dir: str | Path) -> Any:
    """The seqio vocabulary of the tokenizer in `model_dir` (SentencePiece preferred), or None without one."""
    model_dir = Path(model_dir)
    if (model_dir / SENTENCEPIECE_FILE).is_file():
        return seqio.SentencePieceVocabulary(str(model_dir / SENTENCEPIECE_FILE))
    if (model_dir / TOKENIZERS_FILE).is_file():
        return TokenizersVocabulary(str(model_dir / TOKENIZERS_FILE), eos_id=_eos_id(model_dir))
    return None


def corpus_task_name(model_dir: str | Path) -> str:
    """The seqio task name of the embedded corpus tokenized with `model_dir`'s tokenizer (by the file's content, so
    two runs of one tokenizer share it)."""
    files = [Path(model_dir) / n for n in (SENTENCEPIECE_FILE, TOKENIZERS_FILE) if (Path(model_dir) / n).is_file()]
    if not files:
        raise ConversionError(f"{model_dir}: no {SENTENCEPIECE_FILE} or {TOKENIZERS_FILE} to tokenize text with")
    return f"axmini_corpus_{hashlib.sha256(files[0].read_bytes()).hexdigest()[:12]}"


class TokenizedCorpusInput(SeqioInput):
    """The embedded corpus tokenized with the tokenizer of `model_dir` (registered as the task `task`, which
    `corpus_task_name` derives from the tokenizer)."""

    class Config(SeqioInput.Config):
        model_dir: Required[str] = REQUIRED

    def __init__(self, cfg: Config):
        files = corpus.prepare_corpus()
        split_files = {"train": str(files.train), "validation": str(files.validation)}
        register_text_task(cfg.task, split_files, model_vocabulary(cfg.model_dir))
        super().__init__(cfg)
