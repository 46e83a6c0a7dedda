"""Ranking LoRAs for an image: by the retrained classifier, or by the style index (its storage, faiss
kinds and operations)."""
