"""Benchmarks that print a table of what they measured on this machine.

- :mod:`.training`   ``recokd benchmark-train``: it/s and peak memory of teacher, student, each KD method
- :mod:`.inference`  ``recokd benchmark``: accuracy, parameters, FLOPs, latency of bundles side by side
"""
