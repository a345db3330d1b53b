"""The ``python -m fastbn bench`` command line: its options, and running them.

:func:`add_arguments` adds the options to a parser (``fastbn.__main__`` uses it),
:func:`run_from_args` runs a parsed command line, :func:`main` does both.
"""

import argparse
import math
import sys

import fastbn

from .cases import DEFAULT_CASES, DTYPES, OPS, select_cases
from .report import format_report
from .runner import run


def _comma_list(convert, choices=None):
    def parse(text):
        values = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {item!r} (choose from {', '.join(choices)})"
                )
            values.append(convert(item))
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _number(convert, what, minimum, *, above=False):
    """An argparse type: ``convert(text)``, finite and at least ``minimum`` (or, with
    ``above``, more than it)."""
    bound = f"> {minimum}" if above else f">= {minimum}"

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {text}")
        return value

    return parse


def add_arguments(parser):
    """Adds ``bench``'s options to an argparse parser (``python -m fastbn bench``)."""
    names = ", ".join(case.name for case in DEFAULT_CASES)
    parser.add_argument(
        "--shapes", type=_comma_list(str), metavar="LIST",
        help="comma-separated cases: names or shapes such as 32x64x56x56, 32x56x56x64-nhwc "
             "(channel axis last), 256x1024-f64; aliases single, nc, nchw, nhwc, f64, large, "
             f"all. Default: {names}",
    )
    parser.add_argument(
        "--dtype", type=_comma_list(str, DTYPES), metavar="LIST",
        help="run every selected case in this dtype (float32, float64 or both, comma-separated); "
             "default: each case's own",
    )
    parser.add_argument(
        "--ops", type=_comma_list(str, OPS + ("all",)), metavar="LIST",
        help="operations: train (training forward), backward (training backward), eval; "
             "default: all",
    )
    parser.add_argument(
        "--threads", type=_comma_list(_number(int, "thread count", 1)), metavar="LIST",
        help="thread counts for fastbn, torch and the copy, e.g. 1,2: one table per count, and "
             "fastbn and the copy alone at each count on the large cases. Default: "
             f"fastbn.get_num_threads() (now {fastbn.get_num_threads()}), compared with 1 thread "
             "on the large cases",
    )
    parser.add_argument(
        "--repeat", type=_number(int, "round count", 1), metavar="ROUNDS",
        help="interleaved rounds per measurement (default: adapted to --budget)",
    )
    parser.add_argument(
        "--budget", type=_number(float, "budget", 0, above=True), metavar="SECONDS",
        help="aim for the whole run to take about this long (default 80; 1 with --quick)",
    )
    parser.add_argument(
        "--wait-idle", type=_number(float, "wait", 0), default=0.0, metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to leave the "
             "cores idle (for a shared machine; not counted in --budget)",
    )
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--no-scaling", action="store_true", help="skip the thread-scaling table")
    parser.add_argument(
        "--markdown", action="store_true",
        help="print Markdown (header line and tables) for the README",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run in seconds: small shapes, few rounds (numbers are rough)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run_from_args(args):
    """Runs ``bench`` with parsed arguments, prints the report; returns the exit status."""
    try:
        cases = select_cases(args.shapes, args.dtype, quick=args.quick)
    except ValueError as error:
        raise SystemExit(f"fastbn bench: {error}") from None
    ops = OPS if not args.ops or "all" in args.ops else tuple(op for op in OPS if op in args.ops)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 80.0)

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    report = run(
        cases, ops=ops, threads=args.threads, use_torch=not args.no_torch, rounds=args.repeat,
        budget_s=budget, quick=args.quick, scaling=not args.no_scaling, wait_idle_s=args.wait_idle,
        progress=None if args.quiet else progress,
    )
    print(format_report(report, markdown=args.markdown))
    return 0


def main(argv=None):
    """``python -m fastbn bench`` as a function: ``main(["--quick", "--no-torch"])``."""
    overview = sys.modules[__package__].__doc__  # the package's docstring, as for -m fastbn
    parser = argparse.ArgumentParser(
        prog="python -m fastbn bench", description=overview.split("\n\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
