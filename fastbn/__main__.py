"""``python -m fastbn COMMAND``: fastbn's command line.

Each command is a subparser whose ``handler`` takes the parsed arguments and returns the exit
status. To add a command, add its parser in :func:`build_parser` the way ``bench`` is added.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastbn", description="fastbn: fast CPU batch normalization for NumPy."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from fastbn import bench, demo, info

    bench_parser = commands.add_parser(
        "bench",
        help="time fastbn against PyTorch, NumPy and a memory copy",
        description=bench.__doc__.split("\n\n")[0],
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.run_from_args)

    demo_parser = commands.add_parser(
        "demo",
        help="train a small network on the digits with and without BatchNorm",
        description=demo.__doc__.split("\n\n")[0],
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.run)

    info_parser = commands.add_parser(
        "info",
        help="show the versions, OpenMP threads, SIMD level and build flags",
        description=info.__doc__.split("\n\n")[0],
    )
    info.add_arguments(info_parser)
    info_parser.set_defaults(handler=info.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
