class CosyError(Exception):
    """An error caused by the user's input (a file, an argument, a config key).

    The CLI prints it as one line without a traceback, so its message must name the
    file, argument or key at fault.
    """
