"""clipforge: resumable CLIP embedding caches, adapters and fine-tuning."""
__version__ = "0.1.0"
