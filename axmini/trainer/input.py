"""Training and evaluation input: seqio tasks packed into LM batches, and synthetic tokens for benchmarks.

An input yields *process-local* numpy batches with the decoder's keys: `input_ids`, `target_ids`,
`target_weights`, `segment_ids` (0 = padding) and `positions`, each [global_batch_size / process_count,
sequence_length]. How a process gets its rows is `InputSharding`: by default every process reads the same
global batch and keeps its rows, so a run is the same on 1 process x 8 devices and on 2 x 4 (the experiment
does not depend on the hardware); on pods, `PER_PROCESS` has each process read only its shard of the data.
Batches are indexed by step: `batches(start_step=k)` yields the batches of steps k, k+1, ... exactly as an
uninterrupted run would, so the data position of a checkpoint is its step.

`SeqioInput` reads any registered seqio task or mixture (the default is `axmini_corpus`, built from the
embedded corpus on first use) or files on disk (`TextFiles`): `axmini.trainer.data`. `import seqio` loads
TensorFlow (about 5 s), so it is imported lazily.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from axmini.config import REQUIRED, Configurable, ConfigValueError, Required, check_positive, config_path
from axmini.trainer.data import DEFAULT_TASK, TextFiles, get_task_or_mixture, seqio_module

BATCH_KEYS = ("input_ids", "target_ids", "target_weights", "segment_ids", "positions")
Batch = dict[str, np.ndarray]


class InputSharding(enum.Enum):
    """How each process gets its rows of the global batch."""

    # Every process builds the global batch and keeps rows [i * b, (i + 1) * b): results independent of the
    # process count, at the cost of every process doing the whole input work.
    GLOBAL_BATCH_SLICE = "global_batch_slice"
    # Each process reads only its shard of the examples: scales with hosts; batches depend on the process count.
    PER_PROCESS = "per_process"


class Input(Configurable):
    """Base of inputs: step-indexed, process-local batches of `global_batch_size` x `sequence_length`."""

    class Config(Configurable.Config):
        global_batch_size: Required[int] = REQUIRED
        sequence_length: Required[int] = REQUIRED
        sharding: InputSharding = InputSharding.GLOBAL_BATCH_SLICE

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        check_positive(cfg, "global_batch_size", "sequence_length")
        if cfg.global_batch_size % jax.process_count():
            raise ConfigValueError(
                f"{config_path(cfg, 'global_batch_size')}={cfg.global_batch_size} does not split over "
                f"{jax.process_count()} processes; make it a multiple of the process count"
            )

    @property
    def local_batch_size(self) -> int:
        return self.config.global_batch_size // jax.process_count()

    def _read_shard(self) -> tuple[int, int, int]:
        """(shard index, shard count, rows read per step) of this process under the config's sharding."""
        if self.config.sharding is InputSharding.PER_PROCESS:
            return jax.process_index(), jax.process_count(), self.local_batch_size
        return 0, 1, self.config.global_batch_size

    def _local_rows(self, batch: Batch) -> Batch:
        """This process's rows of a batch read under `_read_shard`."""
        if self.config.sharding is InputSharding.PER_PROCESS:
            return batch
        start = jax.process_index() * self.local_batch_size
        return {key: value[start : start + self.local_batch_size] for key, value in batch.items()}

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """The batches of steps start_step, start_step + 1, ... (finite for a finite number of epochs)."""
        raise NotImplementedError(type(self))

    def vocab_size(self) -> int | None:
        """The number of token ids the input can produce (None when unknown)."""
        return None

    def vocabulary(self) -> Any:
        """The seqio vocabulary to encode prompts and decode samples (None for synthetic data)."""
        return None


class SyntheticInput(Input):
    """Uniformly random tokens, one fresh batch per step (derived from seed, step and process): benchmarks."""

    class Config(Input.Config):
        vocab_size: Required[int] = REQUIRED
        seed: int = 0

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        cfg = self.config
        shard, _, rows = self._read_shard()
        shape = (rows, cfg.sequence_length)
        step = start_step
        while True:
            rng = np.random.default_rng([cfg.seed, step, shard])
            tokens = rng.integers(1, cfg.vocab_size, size=(shape[0], shape[1] + 1), dtype=np.int32)
            yield self._local_rows(
                {
                    "input_ids": tokens[:, :-1],
                    "target_ids": tokens[:, 1:],
                    "target_weights": np.ones(shape, np.float32),
                    "segment_ids": np.ones(shape, np.int32),
                    "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
                }
            )
            step += 1

    def vocab_size(self) -> int:
        return self.config.vocab_size


def _lm_batch(features: Mapping[str, np.ndarray]) -> Batch:
    """seqio LMFeatureConverter features -> decoder batch keys."""
    targets = features["decoder_target_tokens"].astype(np.int32)
    if "decoder_segment_ids" in features:
        segment_ids = features["decoder_segment_ids"].astype(np.int32)
        positions = features["decoder_positions"].astype(np.int32)
    else:
        segment_ids = (targets != 0).astype(np.int32)
        positions = np.broadcast_to(np.arange(targets.shape[1], dtype=np.int32), targets.shape).copy()
    return {
        "input_ids": features["decoder_input_tokens"].astype(np.int32),
        "target_ids": targets,
        "target_weights": features["decoder_loss_weights"].astype(np.float32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Pads a short final batch with all-zero rows (segment 0, weight 0)."""
    missing = rows - next(iter(batch.values())).shape[0]
    return {k: np.pad(v, [(0, missing), (0, 0)]) for k, v in batch.items()} if missing else batch


class SeqioInput(Input):
    """A seqio task or mixture, tokenized, packed to `sequence_length` with segment ids, and batched.

    `task` is a registered task or mixture name, or files on disk (a `TextFiles` config). Shuffling is deterministic
    (by `seed`); each process's rows follow `sharding`. With `num_epochs=None` the data repeats forever (training);
    with a number, the last batch is padded.
    """

    class Config(Input.Config):
        task: str | TextFiles.Config = DEFAULT_TASK  # A registered seqio task or mixture name, or files on disk.
        task_modules: list[str] = []  # Modules to import first: they register user tasks.
        split: str = "train"
        shuffle: bool = True
        seed: int = 0
        num_epochs: int | None = None
        pack: bool = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        if isinstance(cfg.task, str):
            self.files: TextFiles | None = None
            self._task = self.registered_task(cfg)
        else:
            self.files = cfg.task.instantiate()
            self.files.check()
            self._task = self.files.task()

    @classmethod
    def register_task(cls, cfg: Config) -> None:
        """Registers the task `cfg.task` names when this input brings its own (here none does: a user's task is
        registered by a module of `task_modules`)."""

    @classmethod
    def registered_task(cls, cfg: Config) -> Any:
        """The seqio task or mixture `cfg.task` names (registered first if this input brings it)."""
        cls.register_task(cfg)
        return get_task_or_mixture(cfg.task, cfg.task_modules, config_path(cfg, "task"))

    def vocabulary(self) -> Any:
        """The task's vocabulary; for files on disk without one, trained first (see `TextFiles.vocabulary`)."""
        if self.files is not None:
            return self.files.vocabulary()
        return self._task.output_features["targets"].vocabulary

    def vocab_size(self) -> int:
        return self.files.vocab_size() if self.files is not None else self.vocabulary().vocab_size

    def dataset(self) -> Any:
        """The unbatched tf.data pipeline of packed examples of this process."""
        seqio = seqio_module()
        cfg = self.config
        self.vocabulary()  # Files on disk: their vocabulary exists before anything is tokenized.
        return seqio.get_dataset(
            self._task.name,
            {"targets": cfg.sequence_length},
            feature_converter=seqio.LMFeatureConverter(pack=cfg.pack),
            dataset_split=cfg.split,
            shuffle=cfg.shuffle,
            num_epochs=cfg.num_epochs,
            shard_info=seqio.ShardInfo(*self._read_shard()[:2]),
            seed=cfg.seed,
            verbose=False,
        )

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        rows = self._read_shard()[2]
        dataset = self.dataset().batch(rows).skip(start_step)
        for features in dataset.as_numpy_iterator():
            yield self._local_rows(_pad_rows(_lm_batch(features), rows))


def input_vocabulary(cfg: Input.Config) -> Any:
    """The vocabulary an input config reads with, without building its pipeline or reading its data (what sampling
    and evaluation need); None for synthetic input. A vocabulary still to be trained is refused, never trained."""
    if not SeqioInput.matches(cfg):
        return None
    if isinstance(cfg.task, str):
        return cfg.klass.registered_task(cfg).output_features["targets"].vocabulary
    return cfg.task.instantiate().vocabulary(train=False)
