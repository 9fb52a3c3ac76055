"""The commands of ``python -m cloud_jax`` and ``python -m cloud_jax.train``, one module each."""


def check_counts(parser, args, minimum: int, *names: str) -> None:
    """``parser.error`` (status 2) naming the first of the options ``names`` (argparse dests)
    whose value is below ``minimum``: counts and sizes that would otherwise fail deep inside a
    run, or time nothing."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")
