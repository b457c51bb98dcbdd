"""The `strop` command. Nothing imports this package."""
