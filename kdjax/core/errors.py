"""The base class of the errors a user fixes from the message alone.

`python -m kdjax.main` prints a KdjaxError as one line, `kdjax: error:
<message>`, with no Python traceback, and exits with status 1
(KDJAX_TRACEBACK=1 shows the traceback). Raise a subclass for bad input: a
config value, a missing dataset, an unwritable workdir, a checkpoint that does
not match the run or cannot be read. Any other exception is a bug in kdjax
and keeps its traceback.
"""


class KdjaxError(Exception):
  """An error whose message is complete: what is wrong and what to do."""
