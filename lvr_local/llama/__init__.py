"""Adapters to llama.cpp: C handles, vocabularies read from GGUF files, chat templates,
and the prefix-cached backend that answers the engine's one question."""
