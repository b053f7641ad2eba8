"""A module that fails while it is imported, for tests/test_config.py."""

raise RuntimeError("this module is broken on purpose")
