"""Data partitions under their documented name, ``fedsup.partition``.

The code lives in ``fedsup.federated.partition``; this module keeps the path that clients import. Nothing
inside fedsup imports it.
"""

from fedsup.federated.partition import dirichlet, iid, label_histogram, shards

__all__ = ["dirichlet", "iid", "label_histogram", "shards"]
