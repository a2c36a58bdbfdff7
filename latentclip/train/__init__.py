"""Distilling a Latent-CLIP for any VAE from a pixel CLIP teacher (``python -m latentclip.train distill``).

``shards``: the WebDataset shards ``python -m latentclip encode`` writes and the trainer reads.
``distributed``: the launch edge (torchrun, SLURM, one process). ``distill``: the training loop.
"""
