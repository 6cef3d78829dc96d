"""The one exception type a user ever sees from gptlab.

Every user mistake (bad config, missing file, corrupt checkpoint, bad corpus) raises ``GptlabError`` with a
one-line message that names the problem and the fix. The CLI prints it as ``gptlab: error: ...`` and exits 2,
without a traceback.
"""


class GptlabError(Exception):
    """A user-facing error: the message is one line saying what is wrong and how to fix it."""
