"""Subcommands of the ``lenskit`` command line, one module each (see :mod:`lenskit.cli`)."""
