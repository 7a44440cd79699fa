# Benchmarks that compare medseg_jax with PyTorch and MONAI, time the engine, model
# scaling and memory; rewrites their block of BENCHMARKS.md. Needs
# `python3 -m pip install -r benchmarks/requirements.txt` first.
PYTHON ?= python3

.PHONY: bench
bench:
	$(PYTHON) benchmarks/report.py
