"""`python -m lvr_local` and the `lvr` command: signals are handled from the first line,
before the slow imports, so that Ctrl-C during start-up is a clean exit (130)."""

from lvr_local import interrupts


def run() -> None:
    interrupts.install()
    from lvr_local.cli import main

    main()


if __name__ == "__main__":
    run()
