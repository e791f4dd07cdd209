"""One module per command-line verb; each defines ``add_arguments(parser)`` and ``run(args) -> int``."""
