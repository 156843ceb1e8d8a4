"""Subcommands of the `kvsched` CLI."""
