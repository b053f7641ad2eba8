"""Federated runs, built on the engine: rounds of client jobs, aggregation, configs and the runner.

Holds the rounds (client sampling, the shared-memory broadcast, durable updates, checkpoints, resume), the
aggregation strategies, data partitions, the run config (schema, problem reporting, ``--set`` overrides,
``module:Class`` resolution), the runner behind ``fedsup.run``, and the chaos tools that check a run lost
nothing.

May import: ``fedsup.engine`` and ``fedsup.cluster``. Never ``fedsup.ui``: nothing here prints.
"""
