"""Example tasks that ship with fedsup."""
