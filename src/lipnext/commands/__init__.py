"""Subcommands of the ``lipnext`` command line (see ``lipnext.cli``)."""
