"""The runner layer: settings, models.toml, model loading, and runs as event streams.

Front ends (the CLI, the TUI, the server, the evaluation harness and `lvr bench`) run
every generation and every score through this layer. They still import a few things
from below it: the values a run reports (decoding's `PieceEvent`, core's `Message`), the
vocabulary and GGUF readers that `lvr vocab` and `lvr models` show, and llama.cpp's
RPC server that `lvr rpc-server` starts; never a backend or a reduction to drive.
"""
