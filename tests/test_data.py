"""Data from disk: .txt / .jsonl / .tfrecord examples against plain-Python readers, a held-out validation split that
is deterministic and disjoint, a vocabulary trained once on a bounded sample, step-indexed batches (a resumed run
reads what the uninterrupted one would), and bad input refused in one line naming the path."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from axmini.config import ConfigValueError
from axmini.trainer import data as data_lib
from axmini.trainer.data import TextFiles
from axmini.trainer.input import SeqioInput
from axmini.trainer.vocabulary import MAX_SENTENCE_BYTES, sentence_pieces

SEQIO_TEST_VOCAB = str(
    pathlib.Path(__import__("seqio").__file__).parent / "test_data/sentencepiece/sentencepiece.model"
)
WORDS = "the cat sat on a mat while dogs ran far away from home under seven blue hills".split()


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 20)))) + f" {seed}-{i}" for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """The same documents as a folder of .txt files, a .jsonl file (text under "body") and a .tfrecord file."""
    root = tmp_path_factory.mktemp("corpus")
    parts = [sentences(60, seed) for seed in range(3)]
    (root / "txt").mkdir()
    for i, part in enumerate(parts):
        (root / "txt" / f"part{i}.txt").write_text("\n".join(part) + "\n\n")  # A trailing empty line: skipped.
    everything = [line for part in parts for line in part]
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(everything))
    with tf.io.TFRecordWriter(str(root / "docs.tfrecord")) as writer:
        for text in everything:
            feature = {"body": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return {"root": str(root), "lines": everything}


def files(train: str, **kw) -> TextFiles:
    return TextFiles.default_config().set(train=train, vocab=SEQIO_TEST_VOCAB, **kw).instantiate()


def texts(source: TextFiles, split: str) -> list[str]:
    return [t.decode() for t in source.texts(split).as_numpy_iterator()]


@pytest.mark.parametrize(("glob", "field"), [("txt", "text"), ("docs.jsonl", "body"), ("docs.tfrecord", "body")])
def test_every_kind_of_file_yields_its_examples_and_the_held_out_split_is_disjoint(corpus, glob, field):
    source = files(f"{corpus['root']}/{glob}", field=field, validation_fraction=0.2)
    source.check()
    train, validation = texts(source, "train"), texts(source, "validation")
    assert sorted(train + validation) == sorted(corpus["lines"])  # Every example once, on one side.
    assert 0.1 < len(validation) / len(corpus["lines"]) < 0.3
    assert texts(source, "validation") == validation  # Deterministic.
    held_out = tf.strings.to_hash_bucket_fast(corpus["lines"], data_lib.HELD_OUT_BUCKETS).numpy() < 2000
    assert sorted(validation) == sorted(t for t, h in zip(corpus["lines"], held_out) if h)


def test_a_validation_glob_is_a_split_of_its_own(corpus):
    source = files(f"{corpus['root']}/txt/part[01].txt", validation=f"{corpus['root']}/txt/part2.txt")
    assert texts(source, "validation") == sentences(60, 2)
    assert sorted(texts(source, "train")) == sorted(sentences(60, 0) + sentences(60, 1))


def test_resumed_input_reads_the_batches_the_uninterrupted_one_would(corpus):
    cfg = SeqioInput.default_config().set(
        task=TextFiles.default_config().set(train=f"{corpus['root']}/docs.jsonl", field="body", vocab=SEQIO_TEST_VOCAB),
        global_batch_size=4,
        sequence_length=16,
        seed=5,
    )
    straight = cfg.instantiate().batches(0)
    expected = [next(straight) for _ in range(5)][3:]
    resumed = cfg.instantiate().batches(3)
    for batch in expected:
        for key, value in next(resumed).items():
            np.testing.assert_array_equal(value, batch[key])


def test_the_vocabulary_is_trained_once_on_a_bounded_sample_and_then_reused(corpus, tmp_path, monkeypatch):
    trained = []
    train = data_lib.train_sentencepiece

    def counting(sample_file, vocab_size, *, exact_size=True):
        trained.append(len(pathlib.Path(sample_file).read_text().splitlines()))
        return train(sample_file, vocab_size, exact_size=exact_size)

    monkeypatch.setattr(data_lib, "train_sentencepiece", counting)
    cache = tmp_path / "run" / "vocab.model"
    cfg = TextFiles.default_config().set(
        train=f"{corpus['root']}/txt", vocab_size=64, vocab_cache=str(cache), vocab_sample_size=50
    )
    source = cfg.instantiate()
    source.check()
    assert source.vocab_size() == 64 and not cache.exists()  # Checking writes nothing.
    vocabulary = source.vocabulary()
    assert trained == [50] and cache.exists()
    assert vocabulary.decode(vocabulary.encode("the cat sat")) == "the cat sat"
    mtime = cache.stat().st_mtime_ns
    cfg.instantiate().vocabulary()  # A resumed run: the cached vocabulary, not a new one.
    assert trained == [50] and cache.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigValueError, match=r"vocab_cache=.*does not exist"):
        cfg.clone(vocab_cache=str(tmp_path / "other.model")).instantiate().vocabulary(train=False)


def test_long_lines_are_cut_for_sentencepiece_at_whitespace():
    long = " ".join(["word"] * 3000)  # 15,000 bytes
    pieces = sentence_pieces(f"first line\n{long}")
    assert pieces[0] == "first line" and all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)
    assert " ".join(pieces[1:]).split() == long.split()


def test_bad_data_is_refused_in_one_line_naming_the_path(corpus, tmp_path):
    (tmp_path / "no_field.jsonl").write_text('{"title": "a"}\n')
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("x\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "bad.model").write_text("not a sentencepiece model")
    (tmp_path / "few.txt").write_text("one line\nanother line\na third line\n")
    cases = [
        (files(f"{tmp_path}/nothing/*.txt"), "matches no file"),
        (files(f"{tmp_path}/no_field.jsonl"), "no_field.jsonl (its first record) has no string field 'text'"),
        (files(f"{corpus['root']}/docs.tfrecord"), "has no bytes feature 'text' (it has 'body')"),
        (files(f"{tmp_path}/mixed"), "matches .jsonl and .txt files"),
        (files(f"{tmp_path}/bad.model"), "not one of .txt, .jsonl, .tfrecord"),
        (files(f"{corpus['root']}/txt", validation_fraction=1.0), "validation_fraction=1.0 must be in (0, 1)"),
        (files(f"{tmp_path}/few.txt"), "validation_fraction=0.01 holds out no example of train="),
        (files(f"{corpus['root']}/txt").config.clone(vocab=str(tmp_path / "bad.model")).instantiate(), "bad.model"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigValueError) as error:
            source.check()
        assert message in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model", "few.txt", "mixed", "no_field.jsonl"]
