"""The one exception type for problems the user caused and can fix.

A bad flag or config value, a missing or malformed file, an artefact from another run: these
raise `UserError`, whose message is one line naming the flag or file and what to do. The entry
points print it as `<program>: error: <message>` and exit 2. Anything else (a bug here, or in
TensorFlow, Keras or NumPy) is not caught and reaches the user with its traceback.

`UserError` is a `ValueError`, so code that catches `ValueError` around the library still does.
"""


class UserError(ValueError):
    """Bad input from the user: a flag, a config value, a file or a directory.

    The message is one line, names the offending value and says what to do about it.
    """
