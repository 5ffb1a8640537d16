"""SentencePiece vocabularies as seqio uses them: training one on a sample of text, and checking a given one.

A trained vocabulary has pad=0, eos=1, unk=2 and no bos (what seqio's LM feature converter expects: id 0 pads).
Training reads one sentence per line of a sample file; the caller bounds the sample.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

from axmini.config import ConfigValueError

MAX_SENTENCE_BYTES = 4000  # SentencePiece skips longer input lines (its limit is 4192 bytes).


def import_tensorflow() -> Any:
    """`import tensorflow` (for tf.data and tf.io.gfile), quiet and kept off the accelerators."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter (CUDA probing...).
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # The input pipeline must not take accelerator memory.
    return tf


def train_sentencepiece(sample_file: str, vocab_size: int, *, exact_size: bool = True) -> bytes:
    """A unigram SentencePiece model of `vocab_size` pieces trained on the lines of `sample_file` (serialized).

    With `exact_size=False` a sample too small for that many pieces gives fewer (at most `vocab_size`).
    Raises ValueError with SentencePiece's reason when it cannot train (e.g. an empty sample).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=sample_file,
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=exact_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(" ".join(str(e).split())) from None
    return model.getvalue()


def sentence_pieces(text: str) -> list[str]:
    """`text` as SentencePiece training lines: one per line of it, each cut at whitespace to MAX_SENTENCE_BYTES."""
    pieces = []
    for line in text.splitlines():
        words, size = [], 0
        for word in line.split():
            length = len(word.encode()) + 1
            if words and size + length > MAX_SENTENCE_BYTES:
                pieces.append(" ".join(words))
                words, size = [], 0
            words.append(word[: MAX_SENTENCE_BYTES // 4])  # A "word" longer than a sentence: keep its start.
            size += length
        if words:
            pieces.append(" ".join(words))
    return pieces


def write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` (local or a tf.io.gfile URL such as gs://) so no reader sees a partial file."""
    if "://" in path:
        tf = import_tensorflow()
        temporary = f"{path}.tmp-{os.getpid()}"
        with tf.io.gfile.GFile(temporary, "wb") as f:
            f.write(data)
        tf.io.gfile.rename(temporary, path, overwrite=True)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as f:
        f.write(data)
    os.replace(f.name, path)


def sentencepiece_size(path: str, where: str) -> int:
    """The number of pieces of the SentencePiece model at `path`; a ConfigValueError naming `where` (a config path)
    when it is missing, not a SentencePiece model, or has no end-of-sequence piece."""
    import sentencepiece as spm

    tf = import_tensorflow()
    if not tf.io.gfile.exists(path):
        raise ConfigValueError(f"{where}={path!r}: no such file")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            processor = spm.SentencePieceProcessor(model_proto=f.read())
        reason = "" if processor.get_piece_size() else "no pieces"
    except (RuntimeError, OSError, TypeError) as e:
        reason = " ".join(str(e).split())[:120]
    if reason:
        raise ConfigValueError(
            f"{where}={path!r} is not a SentencePiece model ({reason}); give a .model file trained by SentencePiece"
        )
    if processor.eos_id() < 0:
        raise ConfigValueError(f"{where}={path!r} has no end-of-sequence piece (eos_id=-1); train it with one")
    return processor.get_piece_size()
