"""Fitting a pair with SVI: its options, the step and its checked recordings, minibatch scaling,
objectives and controls, early stopping, checkpoints."""
