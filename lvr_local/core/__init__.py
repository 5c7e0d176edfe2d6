"""The numpy engine: vocabularies as data, sub-vocabularies, decomposition, the lossless
reduction and its naive baseline, combination and sampling. It imports neither llama.cpp,
click nor textual (an import-linter contract checks it)."""
