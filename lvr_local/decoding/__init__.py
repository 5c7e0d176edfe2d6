"""Decoding with an ensemble: members, prompts, the byte-level phase, core sharing,
stepping and combination, the generation loop, and exact scoring."""
