from common.errors import LookalikeError


class ExportError(LookalikeError):
    """An export or quantisation that can't go on; the message says why in one line."""
