"""The `axmini` command line: train, launch (local multi-process runs, TPU/GPU pods), configs."""
