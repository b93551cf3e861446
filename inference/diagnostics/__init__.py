"""Reading a fitted pair off its Pyro traces: the ELBO's terms, the evidence and its gap, and
whether the estimates can be believed (k-hat, ESS, active units, the gap's decomposition)."""
