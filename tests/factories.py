"""Builders shared by several test modules."""

from __future__ import annotations

# A two-layer model small enough for CPU steps in a second, on the demo data's vocabulary.
SMALL_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=64",
    "objective.block_size=16",
]
