"""Errors a user can act on: each message names the input and what was expected, in one sentence."""


class InputError(ValueError):
    """A tensor, text or setting given to the pack is not what it expects."""


class CheckpointError(ValueError):
    """A file is not a Latent-CLIP checkpoint the pack can read safely."""
