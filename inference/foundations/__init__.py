"""What every other layer stands on: the errors, tracing a pair and reading its layout, the
log-densities and importance-sampling numerics (PSIS, ESS, means with their standard errors),
random streams, devices, processes, atomic files."""
