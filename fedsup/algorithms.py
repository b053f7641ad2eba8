"""Client-side helpers for the algorithms fedsup runs: ``proximal_term`` (FedProx) and ``Scaffold``.

The code lives in ``fedsup.federated.algorithms``; docs/algorithms.md says what a client does for each
strategy. Nothing inside fedsup imports this module.
"""

from fedsup.federated.algorithms import CONTROL_PREFIX, Scaffold, control_of, proximal_term

__all__ = ["CONTROL_PREFIX", "Scaffold", "control_of", "proximal_term"]
