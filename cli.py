"""How the helper scripts (benchmark.py, analyze.py, scripts/export_weights.py, scripts/prepare_imagenet.py) fail:
one line on stderr, `<script>: error: <what is wrong and the fix>`, and a non-zero exit status, never a traceback.

    @cli.one_line_errors('export_weights.py')
    def main(argv=None) -> int:
        ...

Exit status: a ScriptError's own (2 unless it says otherwise); 2 for bad input (ValueError, which the checkpoint and
dataset errors are, OSError, a broken archive); 1 for anything else, whose line names the exception's class.
argparse's usage errors keep argparse's own two lines and status 2.
"""
import functools
import sys
import tarfile
import zipfile
import zlib

BAD_INPUT = (ValueError, OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error)


class ScriptError(Exception):
    """An error whose message already names the problem and the fix; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def describe(exc: BaseException) -> str:
    """`exc` as one line: its message's first line (an OSError: the file and the system's reason); the class name
    in front of the message of anything that is not bad input (a bug, most likely)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f'{exc.filename}: {exc.strerror}' if exc.filename else exc.strerror
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else ''
    if isinstance(exc, (ScriptError,) + BAD_INPUT):
        return text or type(exc).__name__
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def exit_status(exc: BaseException) -> int:
    if isinstance(exc, ScriptError):
        return exc.code
    return 2 if isinstance(exc, BAD_INPUT) else 1


def one_line_errors(prog: str):
    """Decorate a script's `main(argv) -> int` so that every error it raises is printed as one line and returned
    as its exit status; `raise SystemExit('message')` is reported the same way, with status 2."""
    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except SystemExit as e:
                if not isinstance(e.code, str):
                    raise  # argparse (it has printed its usage line and error), or an exit status
                print(f'{prog}: error: {e.code}', file=sys.stderr, flush=True)
                return 2
            except Exception as e:  # noqa: BLE001 (every error becomes one line; that is the point)
                print(f'{prog}: error: {describe(e)}', file=sys.stderr, flush=True)
                return exit_status(e)
        return run
    return decorate
