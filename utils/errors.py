"""One error path for mistakes a user can fix: a one-line message, a non-zero exit, no traceback."""
import sys


class UserError(Exception):
    """A problem with the user's input (a file, a folder or a flag); the message says what to do.

    exit_code 2 means bad usage or data, 1 a failure while working.
    """

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main, argv=None):
    """Run main(argv); turn UserError and Ctrl-C into a one-line message and an exit code.

    A `--debug` flag anywhere on the command line keeps the traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = '--debug' in argv
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        print(f'error: {error}', file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print('interrupted', file=sys.stderr)
        sys.exit(130)
