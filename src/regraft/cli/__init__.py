"""The ``regraft`` command line: one module per command, wired in :mod:`regraft.cli.main`."""
