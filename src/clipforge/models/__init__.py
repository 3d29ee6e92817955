"""Models: the CLIP encoder registry, batched preprocessing, the adapter."""
