"""The `deltatune` command line (entry point: deltatune.cli.main:main)."""
