"""Speed and memory of a Latent-CLIP reward against ReNO's decode-then-CLIP pixel reward.

Not part of the unit tests or the node pack; run ``python -m benchmarks.run --help``.
"""
