"""Errors a user can cause and fix: a bad path or config field, a malformed file, storage that cannot be reached.

Each is raised with a message that is complete on its own: the file, field or location, what was expected and what
was found, and what to do. The command-line entry points (`panoptic_jax.cli`) print that message alone and exit
non-zero; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Base of the user errors; subclasses also derive from the built-in type they refine (ValueError, OSError)."""
