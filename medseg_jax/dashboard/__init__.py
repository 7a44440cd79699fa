"""The web dashboard: every run under a directory, its curves and hosts, and a Stop and a
Resume button (`python -m medseg_jax.dashboard RUNS_DIR`, or `medseg-dashboard`)."""
