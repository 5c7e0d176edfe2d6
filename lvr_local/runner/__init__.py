"""The runner layer: settings, models.toml, model loading, and runs as event streams.

Front ends (the CLI, the TUI, and next a server and an evaluation harness) use this
layer and nothing below it for their decoding work.
"""
