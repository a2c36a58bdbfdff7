"""The mini-world: a trained miniature of the paper's setting, the pack's embedded default.

Scenes and their grammar (``scenes``), a mini VAE (``vae``), a CLIP-free judge (``judge``), a pixel
CLIP and a Latent-CLIP (``clips``), training (``train``) and evaluation (``eval``). Command line:
``python -m latentclip.miniworld train|eval``. See docs/miniworld.md.
"""
