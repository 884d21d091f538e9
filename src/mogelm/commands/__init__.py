"""The `mogelm` subcommands: one module each (add_arguments + run), thin layers over library functions."""
