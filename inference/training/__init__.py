"""Fitting a pair with SVI: the step and its checked recordings, minibatch scaling, checkpoints,
processes and devices."""
