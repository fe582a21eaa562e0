"""Learning algorithms (SPEC §6). Each trainer exposes ``fit(problem, evaluate) -> FitOutcome``."""
