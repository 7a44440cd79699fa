"""What a run's scalars are called and smoothed with, shared by the writers (`events`,
the training loop) and the readers (the dashboard). No JAX here."""

# The loss is also recorded smoothed with exponential moving averages of these decays,
# the curves people read to judge an LR change (`loss_ema_<decay>`).
EMA_DECAYS = (0.9, 0.99, 0.999)
# Throughput is logged per training example: slices, or patches in 3D
# (the kind of data's `unit`), as `<unit>_per_sec` and `<unit>_per_sec_per_device`.
THROUGHPUT_UNITS = ("slices", "patches")
