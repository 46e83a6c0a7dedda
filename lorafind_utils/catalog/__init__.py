"""Getting LoRAs: Civitai, what the paper profile fetches, importing many at once."""
