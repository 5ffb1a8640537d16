"""Input: seqio packing with segment ids loses and duplicates no token; determinism, step indexing, process shards;
the embedded corpus and its vocabulary."""

import collections
import pathlib

import jax
import numpy as np
import pytest

from axmini.trainer import corpus
from axmini.trainer.data import register_text_task
from axmini.trainer.input import InputSharding, SeqioInput, SyntheticInput

SEQIO_TEST_VOCAB = pathlib.Path(__import__("seqio").__file__).parent / "test_data/sentencepiece/sentencepiece.model"
LENGTH = 16


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small text task: 40 documents of 1 to ~60 tokens (some longer than the sequence length)."""
    import seqio

    words = "the cat sat on a mat while dogs ran far away from home".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(40)]
    path = tmp_path_factory.mktemp("task") / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    vocabulary = seqio.SentencePieceVocabulary(str(SEQIO_TEST_VOCAB))
    register_text_task("axmini_test_docs", {"train": str(path), "validation": str(path)}, vocabulary)
    chunks = []
    for line in lines:
        ids = [*vocabulary.encode(line), vocabulary.eos_id]
        chunks += [tuple(ids[i : i + LENGTH]) for i in range(0, len(ids), LENGTH)]
    return collections.Counter(chunks)


def make_input(**kw):
    cfg = SeqioInput.default_config().set(
        task="axmini_test_docs", global_batch_size=4, sequence_length=LENGTH, num_epochs=1, seed=3
    )
    return cfg.set(**kw).instantiate()


@pytest.fixture(scope="module")
def epoch(task):
    """One epoch of the default test input (building a tf.data pipeline costs about a CPU second: share it)."""
    return list(make_input().batches())


def segments(batches):
    """Every packed segment's targets, after checking each row's layout against its segment ids."""
    found = []
    for batch in batches:
        for row in range(batch["target_ids"].shape[0]):
            seg, targets = batch["segment_ids"][row], batch["target_ids"][row]
            np.testing.assert_array_equal(batch["target_weights"][row], (seg > 0).astype(np.float32))
            assert np.all(targets[seg == 0] == 0)
            ids = [s for s in np.unique(seg) if s > 0]
            assert ids == list(range(1, len(ids) + 1))  # Segments numbered 1, 2, ... in order.
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert np.all(np.diff(where) == 1)  # Contiguous.
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(len(where)))
                inputs = batch["input_ids"][row][where]  # Targets shifted right behind a 0, within the segment.
                np.testing.assert_array_equal(inputs, [0, *targets[where][:-1]])
                found.append(tuple(int(t) for t in targets[where]))
    return collections.Counter(found)


def test_packed_epoch_has_every_token_once_with_correct_segment_ids(task, epoch):
    batches = epoch
    assert all(b["input_ids"].shape == (4, LENGTH) for b in batches)
    assert segments(batches) == task
    assert sum(int(b["target_weights"].sum()) for b in batches) == sum(len(c) * n for c, n in task.items())


def test_batches_resume_at_any_step(epoch):
    everything = epoch
    resumed = list(make_input().batches(start_step=3))
    assert len(resumed) == len(everything) - 3
    for a, b in zip(everything[3:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_shuffle_is_deterministic_by_seed(epoch):
    again = next(make_input(seed=3).batches())  # The epoch fixture's seed.
    np.testing.assert_array_equal(again["target_ids"], epoch[0]["target_ids"])
    assert not np.array_equal(next(make_input(seed=4).batches())["target_ids"], epoch[0]["target_ids"])


def test_processes_read_disjoint_shards_that_cover_the_data(task, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shards = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        data = make_input(sharding=InputSharding.PER_PROCESS)
        assert data.local_batch_size == 2
        shards.append(segments(data.batches()))
    assert shards[0] and shards[1]
    assert shards[0] + shards[1] == task  # Together exactly the data: nothing lost, nothing read twice.


def test_processes_keep_their_rows_of_the_same_global_batch_by_default(epoch, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        local = list(make_input().batches())
        assert len(local) == len(epoch)
        for whole, part in zip(epoch, local):
            for key in whole:
                np.testing.assert_array_equal(part[key], whole[key][2 * index : 2 * index + 2])


def test_repeating_input_runs_past_one_epoch(epoch):
    batches = make_input(num_epochs=None).batches()
    for _ in range(2 * len(epoch) + 1):
        next(batches)


def test_unknown_task_is_refused_with_a_suggestion(task):
    with pytest.raises(ValueError, match=r"^task='axmini_test_doc' is not a registered.*'axmini_test_docs'"):
        make_input(task="axmini_test_doc")


def test_bad_batch_size_is_refused(task):
    with pytest.raises(ValueError, match="global_batch_size=0"):
        make_input(global_batch_size=0)


def test_synthetic_input_is_step_indexed():
    cfg = SyntheticInput.default_config().set(vocab_size=50, global_batch_size=8, sequence_length=5, seed=1)
    batches = cfg.instantiate().batches()
    first_three = [next(batches) for _ in range(3)]
    third = next(cfg.instantiate().batches(start_step=2))
    np.testing.assert_array_equal(first_three[2]["input_ids"], third["input_ids"])
    b = first_three[0]
    np.testing.assert_array_equal(b["input_ids"][:, 1:], b["target_ids"][:, :-1])
    assert b["input_ids"].min() >= 1 and b["input_ids"].max() < 50


def test_prose_filter_keeps_paragraphs_and_drops_code_doctests_and_headings():
    text = (
        "Heading\n*******\n\n"
        "This paragraph is prose that wraps\nonto a second line of plain words.\n\n"
        "   if_stmt ::= 'if' expression ':' suite\n   else suite\n\n"
        ">>> print('doctest')\ndoctest\n\n"
        "short\n"
    )
    assert corpus._prose_paragraphs(text) == ["This paragraph is prose that wraps onto a second line of plain words."]


def test_default_corpus_and_vocab_are_built_offline_and_cached(tmp_path, monkeypatch):
    import sentencepiece as spm

    monkeypatch.setenv("AXMINI_CACHE", str(tmp_path))
    files = corpus.prepare_corpus()
    train, validation = files.train.read_text().splitlines(), files.validation.read_text().splitlines()
    assert 700_000 < files.train.stat().st_size + files.validation.stat().st_size < 1_200_000
    assert len(validation) == pytest.approx(len(train) / (corpus.VALIDATION_EVERY - 1), rel=0.01)
    assert not set(train) & set(validation)
    assert files.train.parent.parent == tmp_path
    model = spm.SentencePieceProcessor(model_file=str(corpus.prepare_vocab(256)))
    assert (model.vocab_size(), model.pad_id(), model.eos_id(), model.unk_id(), model.bos_id()) == (256, 0, 1, 2, -1)
    assert model.decode(model.encode(validation[0])) == validation[0]
    mtime = files.train.stat().st_mtime_ns
    assert corpus.prepare_corpus().train.stat().st_mtime_ns == mtime  # Cached: not written again.
