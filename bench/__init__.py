"""Benchmarks of the engine against Postfix, in the same run, on loopback.

`make bench` (or `python -m bench`) runs every scenario several times,
alternating the engine and its peer (Postfix) so that both see the same
machine state, and writes the figures with min / median / max. See
bench/README.md. Nothing here is imported by the engine.
"""
