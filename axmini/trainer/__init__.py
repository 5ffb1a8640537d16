"""Training end to end: trainer (the loop), learner (optax), checkpointer (orbax), input (seqio), evaluator,
summaries, and the embedded default corpus. Import the module you need: `from axmini.trainer.trainer import Trainer`.
"""
