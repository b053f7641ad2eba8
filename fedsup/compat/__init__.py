"""The APIs of other tools, run on the fedsup engine.

``fedsup.compat.fedflow`` takes fedflow's ``Task``, ``TaskStatus``, ``TaskGroup``, ``FedFlow`` and ``Config``: a
fedflow script runs on fedsup once ``import fedflow`` reads ``from fedsup.compat import fedflow``
(docs/migrating.md).

Nothing is imported here: ``import fedsup.compat`` stays as cheap as ``import fedsup``, without torch.

May import: ``fedsup.engine`` only; nothing in the layers imports this package.
"""

from __future__ import annotations

__all__ = ["fedflow"]
