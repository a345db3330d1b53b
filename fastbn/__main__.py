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

    for name, module, handler, summary in (
        ("bench", bench, bench.run_from_args, "time fastbn against PyTorch, NumPy and a memory copy"),
        ("demo", demo, demo.run, "train a small network on the digits with and without BatchNorm"),
        ("info", info, info.run, "show the versions, OpenMP threads, SIMD level and build flags"),
    ):
        command = commands.add_parser(
            name, help=summary, description=module.__doc__.split("\n\n")[0]
        )
        module.add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
