"""Where the text comes from: seqio tasks over the embedded corpus, over a registry, or over files on disk.

- `axmini_corpus` (the default): the embedded corpus (`corpus.py`) with its 2048-piece vocabulary.
- any seqio task or mixture registered in code (`get_task_or_mixture`, importing the modules that register it).
- `TextFiles`: globs of `.txt` / `.jsonl` / `.tfrecord` files built as a seqio task, what `--data` gives:

      TextFiles.default_config().set(train="corpus/")                          # every line of every file below
      TextFiles.default_config().set(train="data/*.jsonl", field="body")       # the "body" string of each record
      TextFiles.default_config().set(train="tr-*.tfrecord", validation="va-*.tfrecord", vocab="sp.model")

  An example is a non-empty line of a .txt file, the `field` string of a .jsonl record, or the `field` bytes
  feature of a tf.train.Example in a .tfrecord file; the files of a glob are of one kind (a directory means every
  such file below it). The validation split is the `validation` glob or, without one, the `validation_fraction` of
  the training examples whose text hashes into held-out buckets: deterministic, and a text that repeats is always
  on the same side. The vocabulary is the SentencePiece model `vocab`, or one of `vocab_size` pieces trained on a
  bounded sample of the training split (`vocab_sample_size` examples read from interleaved files) and cached at
  `vocab_cache`; `finalize` puts it next to the run, so a resumed run reuses it. Everything streams: files are read
  line by line or record by record through tf.data, and only the shuffle buffer and the vocabulary sample are held.

`check()` refuses bad input before anything is written, in one line naming the config path and the file: a glob
that matches nothing, files of an unknown kind or of mixed kinds, a .jsonl or .tfrecord file whose first record
lacks the field, a held-out fraction that holds out nothing, a vocabulary that is not a SentencePiece model.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from axmini.config import REQUIRED, Configurable, ConfigValueError, Required, check_positive, config_path
from axmini.trainer import corpus
from axmini.trainer.vocabulary import (
    import_tensorflow,
    sentence_pieces,
    sentencepiece_size,
    train_sentencepiece,
    write_atomic,
)

DEFAULT_TASK = "axmini_corpus"
DEFAULT_VOCAB_SIZE = 2048
KINDS = (".txt", ".jsonl", ".tfrecord")
HELD_OUT_BUCKETS = 10_000
SHUFFLE_BUFFER_SIZE = 10_000
SPLITS = ("train", "validation")


def seqio_module() -> Any:
    """`import seqio`, lazily (it loads TensorFlow, about 5 s), with TensorFlow quiet and off the accelerators."""
    import_tensorflow()
    import seqio

    return seqio


def split_to_length(dataset: Any, sequence_length: Mapping[str, int] | None = None) -> Any:
    """A seqio preprocessor: splits each example's `targets` into pieces of at most the sequence length,
    so packing never truncates a document (no token is lost)."""
    tf = import_tensorflow()
    if not sequence_length:
        return dataset
    max_len = sequence_length["targets"]

    def split(example: Mapping[str, tf.Tensor]) -> tf.data.Dataset:
        tokens = example["targets"]
        n = tf.size(tokens)
        starts = tf.range(0, n, max_len)
        lengths = tf.minimum(max_len, n - starts)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)})

    return dataset.flat_map(split)


def _text_to_targets(dataset: Any) -> Any:
    return dataset.map(lambda text: {"targets": text})


def _register(name: str, source: Any, vocabulary: Any) -> Any:
    """Registers (once) a seqio Task over a source of text examples: tokenize, EOS, split to length."""
    seqio = seqio_module()
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[_text_to_targets, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos, split_to_length],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )


def register_text_task(name: str, split_files: Mapping[str, str], vocabulary: Any) -> Any:
    """Registers a seqio Task over text files (one document per line): tokenize, EOS, split to length."""
    return _register(name, seqio_module().TextLineDataSource(dict(split_files)), vocabulary)


def register_default_task() -> Any:
    """The `axmini_corpus` task: the embedded corpus with its own 2048-piece SentencePiece vocabulary."""
    seqio = seqio_module()
    files = corpus.prepare_corpus()
    vocabulary = seqio.SentencePieceVocabulary(str(corpus.prepare_vocab(DEFAULT_VOCAB_SIZE)))
    split_files = {"train": str(files.train), "validation": str(files.validation)}
    return register_text_task(DEFAULT_TASK, split_files, vocabulary)


def get_task_or_mixture(name: str, modules: tuple[str, ...] | list[str] = (), path: str = "input.task") -> Any:
    """The registered seqio task or mixture `name` (importing `modules` first, which register tasks)."""
    seqio = seqio_module()
    for module in modules:
        importlib.import_module(module)
    if name == DEFAULT_TASK:
        register_default_task()
    known = [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
    if name not in known:
        close = difflib.get_close_matches(name, [*known, DEFAULT_TASK], n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigValueError(
            f"{path}={name!r} is not a registered seqio task or mixture{hint} "
            "(register it in a module listed in task_modules, or read files: --data)"
        )
    return seqio.get_mixture_or_task(name)


# ----------------------------------------------------------------------------------------------------
# Files on disk.


def _glob(pattern: str) -> list[str]:
    """The files `pattern` names, sorted: a glob (`**` recursive), or a directory for every file of KINDS below it."""
    if "://" in pattern:
        return sorted(import_tensorflow().io.gfile.glob(pattern))
    if os.path.isdir(pattern):
        return sorted(str(p) for p in Path(pattern).rglob("*") if p.suffix in KINDS and p.is_file())
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if not os.path.isdir(p))


def _open(path: str) -> Any:
    return import_tensorflow().io.gfile.GFile(path, "r") if "://" in path else open(path, encoding="utf-8")


def _jsonl_text(line: str, field: str, where: str) -> str:
    """The `field` string of a JSON line; ValueError naming `where` (file and line) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg})") from None
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        fields = ", ".join(repr(k) for k in record) if isinstance(record, dict) else f"a {type(record).__name__}"
        raise ValueError(f"{where} has no string field {field!r} (it has {fields})")
    return value


def _jsonl_texts(path: bytes, field: bytes) -> Iterator[str]:
    """The `field` strings of a .jsonl file, streamed (a tf.data generator: arguments arrive as bytes)."""
    name, key = path.decode(), field.decode()
    with _open(name) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_text(line, key, f"{name} line {number}")


def _no_function_source_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using an uncached FunctionDataset")


class TextFiles(Configurable):
    """Text files on disk as a seqio task with a SentencePiece vocabulary; see the module docstring."""

    class Config(Configurable.Config):
        train: Required[str] = REQUIRED  # A glob (or directory) of .txt, .jsonl or .tfrecord files.
        validation: str | None = None  # A glob; None: hold out validation_fraction of the training examples.
        validation_fraction: float = 0.01
        field: str = "text"  # The text of a .jsonl record / a .tfrecord tf.train.Example.
        vocab: str | None = None  # A SentencePiece model; None: one trained on a sample, cached at vocab_cache.
        vocab_size: int | None = None  # Of the trained vocabulary (finalize: the model's vocab_size).
        vocab_cache: str | None = None  # Where the trained vocabulary is kept (finalize: <trainer dir>/vocab.model).
        vocab_sample_size: int = 100_000  # Training examples the vocabulary is trained on, at most.

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._vocabulary: Any = None

    # ------------------------------------------------------------------------------------------------
    # Checks, before anything is read in bulk or written.

    def files(self, split: str) -> list[str]:
        """The files of `split` (sorted)."""
        cfg = self.config
        return _glob(cfg.validation if split == "validation" and cfg.validation is not None else cfg.train)

    def check(self) -> None:
        """Refuses what cannot be read (see the module docstring): reads a record a file, and with a held-out split
        at most as far as its first example, nothing in bulk."""
        cfg = self.config
        check_positive(cfg, "vocab_size", "vocab_sample_size")
        if cfg.validation is None and not 0 < cfg.validation_fraction < 1:
            raise ConfigValueError(
                f"{config_path(cfg, 'validation_fraction')}={cfg.validation_fraction} must be in (0, 1) to hold "
                f"out a validation split (or set {config_path(cfg, 'validation')} to a glob)"
            )
        for name in ("train", "validation"):
            if getattr(cfg, name) is not None:
                self._check_files(name)
        if cfg.vocab is not None:
            sentencepiece_size(cfg.vocab, config_path(cfg, "vocab"))
        elif cfg.vocab_cache is None or cfg.vocab_size is None:
            missing = "vocab_cache" if cfg.vocab_cache is None else "vocab_size"
            raise ConfigValueError(
                f"{config_path(cfg, missing)} is None: a vocabulary to train needs its size and a place to keep it "
                f"(finalize fills both from the trainer; or give one: {config_path(cfg, 'vocab')}, --vocab)"
            )
        elif self._exists(cfg.vocab_cache):
            sentencepiece_size(cfg.vocab_cache, config_path(cfg, "vocab_cache"))
        if cfg.validation is None and not any(True for _ in self.texts("validation").take(1)):
            raise ConfigValueError(
                f"{config_path(cfg, 'validation_fraction')}={cfg.validation_fraction} holds out no example of "
                f"{config_path(cfg, 'train')}={cfg.train!r}: too little data for it; raise it (--validation_fraction)"
            )

    def _check_files(self, name: str) -> None:
        pattern = getattr(self.config, name)
        files = _glob(pattern)
        where = f"{config_path(self.config, name)}={pattern!r}"
        if not files:
            raise ConfigValueError(f"{where} matches no file; check the path (--data, --validation_data)")
        kinds = {os.path.splitext(f)[1] for f in files}
        unknown = sorted(kinds - set(KINDS))
        if unknown:
            example = next(f for f in files if os.path.splitext(f)[1] == unknown[0])
            raise ConfigValueError(f"{where} matches {example}, not one of {', '.join(KINDS)}; narrow the glob")
        if len(kinds) > 1:
            raise ConfigValueError(f"{where} matches {' and '.join(sorted(kinds))} files; use one kind per glob")
        for path in files:
            try:
                self._first_text(path)
            except ValueError as e:
                field = config_path(self.config, "field")
                raise ConfigValueError(f"{where}: {e}; set the field ({field}, --data_field)") from None

    def _first_text(self, path: str) -> None:
        """Reads the first record of `path`; ValueError when it has no text in the configured field."""
        kind, field = os.path.splitext(path)[1], self.config.field
        if kind == ".jsonl":
            with _open(path) as f:
                line = next((line for line in f if line.strip()), None)
            if line is not None:
                _jsonl_text(line, field, f"{path} (its first record)")
        elif kind == ".tfrecord":
            tf = import_tensorflow()
            for record in tf.data.TFRecordDataset(path).take(1).as_numpy_iterator():
                feature = tf.train.Example.FromString(record).features.feature
                if field not in feature or not feature[field].bytes_list.value:
                    raise ValueError(
                        f"{path} (its first tf.train.Example) has no bytes feature {field!r} (it has "
                        f"{', '.join(repr(k) for k in feature) or 'none'})"
                    )

    @staticmethod
    def _exists(path: str) -> bool:
        return import_tensorflow().io.gfile.exists(path)

    # ------------------------------------------------------------------------------------------------
    # The task and its vocabulary.

    @property
    def vocab_path(self) -> str:
        cfg = self.config
        return cfg.vocab if cfg.vocab is not None else cfg.vocab_cache

    def task(self) -> Any:
        """The seqio task (registered once per process, under a name derived from the config)."""
        cfg = self.config
        key = json.dumps([cfg.train, cfg.validation, cfg.validation_fraction, cfg.field, self.vocab_path])
        name = f"axmini_files_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        seqio = seqio_module()
        # seqio warns that a function source reshuffles badly on restarts: ours resume by skipping to the step.
        logging.getLogger("absl").addFilter(_no_function_source_warning)
        source = seqio.FunctionDataSource(self.texts, splits=SPLITS)
        return _register(name, source, seqio.SentencePieceVocabulary(self.vocab_path))

    def texts(self, split: str, shuffle_files: bool = False, seed: int | None = None) -> Any:
        """The text examples of `split` as a tf.data dataset of strings, streamed from the files."""
        tf = import_tensorflow()
        cfg = self.config
        files = self.files(split)
        kind = os.path.splitext(files[0])[1]
        names = tf.data.Dataset.from_tensor_slices(files)
        if shuffle_files:
            names = names.shuffle(len(files), seed=seed)

        def read(path: tf.Tensor) -> tf.data.Dataset:
            if kind == ".txt":
                return tf.data.TextLineDataset(path).filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
            if kind == ".jsonl":
                spec = tf.TensorSpec((), tf.string)
                return tf.data.Dataset.from_generator(_jsonl_texts, args=(path, cfg.field), output_signature=spec)
            feature = {cfg.field: tf.io.FixedLenFeature([], tf.string)}
            return tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, feature)[cfg.field])

        texts = names.interleave(read, cycle_length=min(len(files), 8))  # Sequential: deterministic.
        if cfg.validation is None:
            held_out = round(cfg.validation_fraction * HELD_OUT_BUCKETS)

            def in_split(text: tf.Tensor) -> tf.Tensor:
                validation = tf.strings.to_hash_bucket_fast(text, HELD_OUT_BUCKETS) < held_out
                return validation if split == "validation" else tf.logical_not(validation)

            texts = texts.filter(in_split)
        return texts

    def vocab_size(self) -> int:
        """The number of ids of the vocabulary (before a vocabulary is trained: the size it is trained to)."""
        cfg = self.config
        if cfg.vocab is None and not self._exists(cfg.vocab_cache):
            return cfg.vocab_size
        return sentencepiece_size(self.vocab_path, config_path(cfg, "vocab" if cfg.vocab else "vocab_cache"))

    def vocabulary(self, *, train: bool = True) -> Any:
        """The seqio vocabulary. One still missing is trained first, by process 0 while the others wait, unless
        `train` is False, which refuses it (readers of a run never write)."""
        cfg = self.config
        if self._vocabulary is None:
            if cfg.vocab is None and train:
                if jax.process_index() == 0 and not self._exists(cfg.vocab_cache):
                    self._train_vocabulary()
                if jax.process_count() > 1:  # On the first call of every process, whoever trained.
                    multihost_utils.sync_global_devices("axmini_train_vocabulary")
            if cfg.vocab is None and not self._exists(cfg.vocab_cache):
                raise ConfigValueError(
                    f"{config_path(cfg, 'vocab_cache')}={cfg.vocab_cache!r} does not exist: the run has not trained "
                    "its vocabulary yet (its training does that first)"
                )
            self._vocabulary = seqio_module().SentencePieceVocabulary(self.vocab_path)
        return self._vocabulary

    def _train_vocabulary(self) -> None:
        cfg = self.config
        sample = self.texts("train", shuffle_files=True, seed=0).take(cfg.vocab_sample_size)
        with tempfile.TemporaryDirectory() as tmp:
            sample_file = os.path.join(tmp, "sample.txt")
            with open(sample_file, "w", encoding="utf-8") as f:
                for text in sample.as_numpy_iterator():
                    f.writelines(piece + "\n" for piece in sentence_pieces(text.decode("utf-8", "replace")))
            try:
                model = train_sentencepiece(sample_file, cfg.vocab_size, exact_size=False)
            except ValueError as e:
                raise ConfigValueError(
                    f"{config_path(cfg, 'vocab_size')}={cfg.vocab_size}: no vocabulary could be trained on the "
                    f"training split of {config_path(cfg, 'train')}={cfg.train!r} ({e}); give one (--vocab)"
                ) from None
        write_atomic(cfg.vocab_cache, model)
