"""Fixtures for the report tests: tiny tasks that the engine can import in its child processes."""
