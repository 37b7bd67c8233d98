"""`python -m custom_ops build [--force]`: build the library (if needed) and print its path.
`python -m custom_ops install DIR`: copy it into a model folder (for onnxruntime-genai)."""

import argparse
import sys

from .build import BuildError, ensure_built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom_ops", description=__doc__)
    parser.add_argument("command", choices=["build", "install"],
                        help="build the custom-op library, or install a copy into DIR")
    parser.add_argument("folder", nargs="?", help="install: the model folder")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    if args.command == "install" and not args.folder:
        parser.error("install needs the model folder: python -m custom_ops install DIR")
    try:
        if args.command == "install":
            from .install import install

            if args.force:
                ensure_built(force=True)
            print(install(args.folder))
        else:
            print(ensure_built(force=args.force))
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        if e.fix:
            print(f"fix: {e.fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
