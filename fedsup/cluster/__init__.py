"""Runs across machines: the Ray backend (a node agent per Ray node, the driver side) will live here.

Empty for now. May import: ``fedsup.engine`` only; the federated layer builds on it, not the other way.
"""
