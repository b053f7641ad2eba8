"""The run config under its documented name, ``fedsup.config`` (``json_schema()`` for editors).

The code lives in ``fedsup.federated.config``; this module keeps the path that tools import. Nothing
inside fedsup imports it.
"""

from fedsup.federated.config import RunConfig, json_schema, load_config, to_yaml

__all__ = ["RunConfig", "json_schema", "load_config", "to_yaml"]
