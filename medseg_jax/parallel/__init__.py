"""Parallelism: strategies (pmap, shard_map, gspmd), multi-host helpers, process start-up.

Deliberately empty: `distributed` must import before JAX's backend starts, so the
package imports none of its modules itself.
"""
