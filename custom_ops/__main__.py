"""`python -m custom_ops build [--force]`: build the library (if needed) and print its path."""

import argparse
import sys

from .build import BuildError, ensure_built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom_ops", description=__doc__)
    parser.add_argument("command", choices=["build"], help="build the custom-op library")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        print(ensure_built(force=args.force))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.fix:
            print(f"fix: {e.fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
