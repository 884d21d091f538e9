"""The `mogelm` subcommands, one module each (cli.py's COMMANDS names them): a thin layer that parses
flags, calls library functions and prints. Each module exposes

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None      # exit status (None means 0)

    train       mogelm.commands.train       training                      (mogelm.train)
    eval        mogelm.commands.eval        loss and routing statistics   (mogelm.evaluate)
    compare     mogelm.commands.compare     the main job: MoGE vs top-k   (mogelm.compare)
    generate    mogelm.commands.generate    sampling                      (mogelm.inference.Engine)
    serve       mogelm.commands.serve       OpenAI-compatible server      (mogelm.inference.server)
    bench       mogelm.commands.bench       load test of a server         (mogelm.inference.loadgen)
    sim         mogelm.commands.sim         system simulator              (mogelm.sim)
    imbalance   mogelm.commands.imbalance   Monte-Carlo Imbalance Score   (mogelm.analysis.metrics)
    info        mogelm.commands.info        shapes and parameter counts   (mogelm.info)

_checks.py holds the flag checks several commands share (device names, ranges); it is no command.
Library code never imports this package (nor mogelm.cli); only cli.py does, one module at a time.
"""
