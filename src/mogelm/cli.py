"""The `mogelm` command: thin subcommands over library functions.

Each subcommand lives in its own module (mogelm/commands/, a thin layer over library functions),
which exposes two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None      # exit status (None means 0)

Modules are imported only when their subcommand runs, so `mogelm --help` and quick commands stay
fast and optional dependencies (matplotlib, fastapi, triton) are needed only where used.
A `UserError` becomes a one-line `error: ...` on stderr and exit status 2, with no traceback
(tests/test_cli_errors.py holds every command to that, with a table of bad inputs).

`args.explicit` is the set of options the user gave on the command line (their `dest` names), so
a command can tell a default from a choice: `mogelm train --resume` compares only those with
the checkpoint's settings.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mogelm.errors import UserError, run_for_user

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mogelm.commands.train", "train a MoGE (or top-k / dense) language model on text"),
    "compare": ("mogelm.commands.compare",
                "train MoGE and its top-k twin on the same data and write a report (the main job)"),
    "eval": ("mogelm.commands.eval", "loss, perplexity and routing statistics of a checkpoint on text"),
    "generate": ("mogelm.commands.generate", "sample text from a checkpoint through the KV cache"),
    "serve": ("mogelm.commands.serve", "OpenAI-compatible HTTP server on loopback"),
    "bench": ("mogelm.commands.bench", "benchmarks: `bench serve` load-tests a running server"),
    "sim": ("mogelm.commands.sim",
            "system simulator: parallel layout, batch and throughput for given hardware"),
    "imbalance": ("mogelm.commands.imbalance",
                  "Monte-Carlo Imbalance Score of top-k vs MoGE routing (paper Fig. 2b)"),
    "info": ("mogelm.commands.info", "show a preset or checkpoint: shapes and parameter counts"),
    "quantize": ("mogelm.commands.quantize",
                 "write an fp8 copy of a checkpoint (e4m3 experts, per-channel scales)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(
        prog="mogelm",
        description="Mixture of Grouped Experts (MoGE) language models: train, analyse, simulate, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("mogelm"):
                    raise UserError(f"`mogelm {name}` is not available in this build ({e.name} is missing)") \
                        from None
                raise UserError(
                    f"`mogelm {name}` needs the Python package {e.name!r}; install it with "
                    f"`pip install {e.name}` (or the matching mogelm extra)"
                ) from None
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run, _parser=p)
    return parser, chosen


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The `dest` of every option (flag) in `argv` that `parser` (a subcommand's) sets: `argv`
    parsed again with the flags' defaults suppressed, so only what was given lands in the
    namespace (positional arguments keep their defaults: argparse checks those against choices)."""
    saved = [(a, a.default) for a in parser._actions if a.option_strings]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, default in saved:
            a.default = default
    flags = {a.dest for a, _ in saved}
    return {k for k in vars(given) if k in flags}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int:
        parser, _ = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv else 2
        args.explicit = explicit_options(args._parser, argv[argv.index(args.command) + 1:])
        return args._run(args)

    return run_for_user(run)


if __name__ == "__main__":
    sys.exit(main())
