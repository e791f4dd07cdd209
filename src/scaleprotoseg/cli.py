"""Command-line entry point: ``scaleprotoseg VERB ...`` (also ``python -m scaleprotoseg``).

Each verb lives in its own module under :mod:`scaleprotoseg.commands`, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing a verb's module when it is used, and sets up the messages:
the package's loggers (``logging.getLogger(__name__)`` in each module) go to the console through one handler, set up
here for the length of a command (``-v`` adds debug messages, ``-q`` keeps warnings and results), and stdout is line
buffered so that a redirected log fills as the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from scaleprotoseg.commands.options import add_common  # argparse only: --help stays fast

VERBS = {
    "data": "check data folders and build the real sample datasets",
    "train": "train a model through all its stages (resumable)",
    "evaluate": "measure a trained run: mIoU, per-class IoU, confusion matrix",
    "predict": "segment images with a trained run",
    "explain": "explain a prediction with prototypes and groups",
    "analyze": "interpretability metrics and analyses of a trained run",
    "report": "write a self-contained HTML report of a run",
    "export": "export a run's model: ONNX, TorchScript, torch.export program or a Hub directory",
    "explore": "a local web app: why this class at this pixel, what if a prototype is removed",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleprotoseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    add_common(parser)  # also accepted after the verb: each verb's parser gets them too
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_verb=verb)
    return parser


def _version() -> str:
    from scaleprotoseg import __version__

    return f"scaleprotoseg {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the verb first, then let the verb's module add its own arguments.
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb not in VERBS:
        args = parser.parse_args(argv)  # prints help or the error for an unknown verb
        parser.print_help()
        return 2
    if "torch" not in sys.modules:
        # Before OpenMP starts: idle OpenMP threads sleep instead of spinning, so a run on a busy machine (another job,
        # data-loader workers) does not slow down several-fold. Set OMP_WAIT_POLICY yourself to choose otherwise.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(f"scaleprotoseg.commands.{verb}")
    verb_parser = argparse.ArgumentParser(prog=f"scaleprotoseg {verb}", description=VERBS[verb])
    module.add_arguments(verb_parser)
    add_common(verb_parser)
    idx = argv.index(verb)
    args = verb_parser.parse_args(argv[:idx] + argv[idx + 1 :])
    _line_buffered(sys.stdout)
    with console_logging(log_level(getattr(args, "verbose", 0) or 0, getattr(args, "quiet", 0) or 0)):
        try:
            return int(module.run(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (ValueError, OSError, RuntimeError, MemoryError) as err:
            # errors a user can cause (bad values, files, out of memory): one line; --debug keeps the traceback
            if getattr(args, "debug", False):
                raise
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 1


LOGGER = "scaleprotoseg"  # the package's loggers are its children


def log_level(verbose: int, quiet: int) -> int:
    """INFO by default; each ``-v`` one level lower (DEBUG), each ``-q`` one higher (WARNING, ERROR)."""
    return min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


class ConsoleHandler(logging.Handler):
    """Messages below WARNING to stdout as written (the text the commands printed before they logged), warnings and
    errors to stderr as ``warning: ...``; the streams are looked up at each message and flushed after it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"{record.levelname.lower()}: {text}"
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def console_logging(level: int) -> Iterator[logging.Handler]:
    """Send the package's messages of ``level`` and above to the console for the length of a command; the package
    logger itself passes debug messages on, so that a file handler (the run's ``train.log``) gets them all."""
    logger = logging.getLogger(LOGGER)
    handler = ConsoleHandler(level)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # a root handler set up by an embedding program would print every message twice
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _line_buffered(stream: object) -> None:
    """A stdout redirected to a file is block buffered: make it flush at each line so the file fills as we run."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None and not getattr(stream, "line_buffering", True):
        with suppress(ValueError, OSError):  # e.g. a stream that cannot change any more
            reconfigure(line_buffering=True)


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one printable line (file names that are not UTF-8 get U+FFFD)."""
    if isinstance(err, MemoryError):
        text = (
            f"out of memory ({err or 'MemoryError'}); expected smaller inputs (e.g. SCALEPROTOSEG_MAX_PIXELS, tiling)"
        )
    elif isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.args[-1]):
        text = f"{err.filename}: {err.strerror or err}"  # e.g. PermissionError: the file first, then the reason
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


if __name__ == "__main__":
    raise SystemExit(main())
