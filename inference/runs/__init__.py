"""The application layer: pairs built from a run's config, run directories (new, resumed,
loaded), diagnosing a run, its report and runs compared."""
