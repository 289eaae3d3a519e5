"""`lowbit` command line: one small module per verb; this file only dispatches and reports errors."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .. import __version__
from ..errors import LowbitError
from ..log import logger
from . import analyze as analyze_cmd
from . import compare as compare_cmd
from . import demo as demo_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import generate as generate_cmd
from . import import_ as import_cmd
from . import info as info_cmd
from . import plan as plan_cmd
from . import quantize as quantize_cmd
from . import recipes as recipes_cmd

VERBS = (quantize_cmd, plan_cmd, compare_cmd, recipes_cmd, eval_cmd, generate_cmd, export_cmd, import_cmd, info_cmd, analyze_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit quantization of LLMs, organized around outliers.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(debug: bool, quiet: bool) -> None:
    for old in [h for h in logger.handlers if getattr(h, "lowbit_cli", False)]:
        logger.removeHandler(old)               # main() may run many times in one process (tests)
    handler = _StderrHandler()
    handler.lowbit_cli = True
    handler.setFormatter(logging.Formatter("lowbit: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    if not debug:                               # transformers' own chatter is not ours to print
        logging.getLogger("transformers").setLevel(logging.ERROR)
        import warnings
        warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)        # recorded by the verbs that write files
    _setup_logging(args.debug, args.quiet)
    try:
        return args.run(args) or 0
    except LowbitError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        if args.debug:
            traceback.print_exc()
        print("lowbit: error: out of memory (the predicted peak is logged before the run; fewer --samples, "
              "--offload, or --lazy for a model larger than memory)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
