"""The one finalize step: the config a run trains with, on given hardware, complete before anything is built.

`finalize(cfg, instance_type)` is shared by `axmini train`, `axmini configs show --mesh_selector`, `axmini launch`
and the `Trainer` (which builds nothing else), so the config a user inspects is byte for byte the run's config.txt:

- the instance type (given; else `mesh_selector`; else the hardware's) selects the first matching mesh rule, whose
  modifiers rewrite the config (remat, batch size... for that hardware); the rule is recorded as `mesh_rule` and the
  instance type as `mesh_selector`;
- what the trainer owns is written into its children: the checkpoint and summary dirs under `dir`,
  `learner.max_step`, and for data from disk without a given vocabulary, the size of the vocabulary to train (the
  model's `vocab_size`) and where it is cached (`<dir>/vocab.model`, next to the run).

A field the user has set is kept (a conflicting `learner.max_step` is refused); a `dir` or `max_step` still REQUIRED
is left for the Trainer to report by its path.
"""

from __future__ import annotations

import os

from axmini.config import REQUIRED, ConfigValueError, fill_child, map_configs, stamp_paths
from axmini.mesh_rules import detect_instance_type, instance_type, select_mesh_rule
from axmini.trainer.data import TextFiles
from axmini.trainer.trainer import Trainer

VOCAB_FILE = "vocab.model"  # In the trainer dir: the vocabulary trained for data from disk.


def finalize(cfg: Trainer.Config, instance: str | None = None) -> Trainer.Config:
    """A finalized copy of the experiment config `cfg` for the instance type `instance` (see the module doc)."""
    if cfg.mesh_rule is not None:
        raise ConfigValueError(
            f"mesh_rule is set (to the rule {cfg.mesh_rule.pattern!r}): the config is finalized already; "
            "finalize the experiment's own config"
        )
    selector = instance or cfg.mesh_selector or detect_instance_type()
    instance_type(selector)  # Refuses an instance type that does not exist, by name.
    rule = select_mesh_rule(selector, cfg.mesh_rules)
    cfg = cfg.clone()
    for modifier in rule.modifiers:
        cfg = modifier.instantiate()(cfg)
    cfg.set(mesh_selector=selector, mesh_rule=rule)
    stamp_paths(cfg)  # A refused value below is named by its path (learner.max_step).
    if cfg.dir is not REQUIRED:
        if cfg.checkpointer.dir is REQUIRED:
            cfg.checkpointer.dir = os.path.join(cfg.dir, "checkpoints")
        if cfg.summary_writer.dir is REQUIRED:
            cfg.summary_writer.dir = cfg.dir
    if cfg.max_step is not REQUIRED:
        cfg.learner = fill_child(cfg.learner, parent=cfg, max_step=cfg.max_step)
    return map_configs(cfg, TextFiles.matches, lambda files: _fill_vocab(files, cfg))


def _fill_vocab(files: TextFiles.Config, cfg: Trainer.Config) -> TextFiles.Config:
    """Where a vocabulary trained for `files` is cached (next to the run), and its size (the model's)."""
    if files.vocab is not None:
        return files
    if files.vocab_cache is None and cfg.dir is not REQUIRED:
        files.vocab_cache = os.path.join(cfg.dir, VOCAB_FILE)
    model_vocab_size = getattr(cfg.model, "vocab_size", None)
    if files.vocab_size is None and isinstance(model_vocab_size, int):
        files.vocab_size = model_vocab_size
    return files
