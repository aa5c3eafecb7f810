"""Imported by the fork server alone, first of its preloads, which ``_forkserver.launch_server`` makes it:
the server then imports what every worker would. Nothing else imports this module."""

from ._forkserver import in_the_server

in_the_server()
