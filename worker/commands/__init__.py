"""Sub-commands of the ``tagstream`` command line, one module each.

Each module exposes ``configure(parser)`` to declare its arguments and
``execute(args) -> int`` returning the process exit code.
"""
