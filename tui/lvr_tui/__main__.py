"""`python -m tui`: the chat app with the default models.toml (or $LVR_CONFIG)."""

from lvr_tui.app import LvrApp


def main() -> None:
    LvrApp().run()


if __name__ == "__main__":
    main()
