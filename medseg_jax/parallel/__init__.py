"""Parallelism: strategies (pmap, shard_map, gspmd), multi-host helpers, process start-up.

The one package that touches pmap, shard_map, meshes and collectives; the packages below
it (data, models) are handed what they need from here (e.g. `multihost.barrier`).
"""
