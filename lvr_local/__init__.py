"""lvr-local: ensembles of local GGUF language models over their common vocabulary.

Data flows one way: GGUF -> vocabulary -> sub-vocabulary tables -> reduced states
(fed by the backend) -> ensemble -> events -> CLI/TUI.
"""

__version__ = "0.1.0"
