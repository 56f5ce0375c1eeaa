"""Training: the phases of a run (train.py), its compiled steps, optimizers, data parallelism, checkpoints and logs."""
