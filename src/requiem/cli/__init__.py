"""The `requiem` command."""
