"""The command-line parser shared by every script (data preparation, training, inference, benchmarks)."""
import argparse

from utils.errors import UserError


class CliParser(argparse.ArgumentParser):
    """argparse with the project's error path (one line, exit code 2, no usage dump), reading `@file`
    arguments one flag per line (`--ngf 32`) with blank lines and # comments skipped."""

    def convert_arg_line_to_args(self, line):
        line = line.split('#', 1)[0].strip()
        return line.split() if line else []

    def error(self, message):
        raise UserError(f'{self.prog}: {message} (see --help)')

    def _read_args_from_files(self, arg_strings):
        try:
            return super()._read_args_from_files(arg_strings)
        except OSError as error:
            raise UserError(f'{error.filename}: cannot read this arguments file ({error.strerror})') from None
