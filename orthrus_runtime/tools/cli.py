"""The `orthrus` command. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; modules load only when used."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

SUBCOMMANDS = {
    "generate": ("orthrus_runtime.tools.generate", "generate text from one prompt"),
    "serve": ("deployment.cli", "run the Ray Serve application (HTTP 8000, gRPC 9000)"),
    "client": ("orthrus_runtime.client", "stream a completion from a running server over gRPC"),
    "bench": ("orthrus_runtime.tools.bench", "load-test a running server (HTTP or gRPC)"),
    "distill": ("orthrus_runtime.tools.distill", "train a diffusion view for a base model"),
    "eval-acceptance": ("orthrus_runtime.tools.eval_acceptance", "measure acceptance on MT-bench and HumanEval"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="orthrus", description="Orthrus Serve: lossless dual-view decoding.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"orthrus {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(p)
    args = p.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
