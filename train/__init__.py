"""Objectives, the megatron.core trainer, checkpoints, logging and the HF conversion glue."""

# model's import quiets megatron.core's import-time warnings about missing TE / apex; it has to come
# before train's own megatron.core imports.
import model  # noqa: F401
