"""Making smaller models out of bigger ones (the seed papers MC-Suite, enlarge-and-prune and instruction-following
pruning):

- `experts`: MoE expert pruning (MC-Suite criteria, iterative rounds, lottery and recovery fine-tuning);
- `structured`: width and depth pruning of dense decoders (FFN units, heads, channels, layers) to a target shape;
- `enlarge_and_prune`: the enlarge-and-prune pipeline, a trainer that prunes its model at scheduled steps, with
  optional logit distillation from the enlarged model (`distillation`);
- `instruction`: instruction-following pruning, a per-input FFN mask predicted from the prompt (a feature:
  `InstructionPruningModifier`), with decoding on the gathered active units;
- `slicing`, `calibration`, `fine_tune`: what those share (slicing by logical axis, running calibration batches,
  short fine-tunes).
"""
