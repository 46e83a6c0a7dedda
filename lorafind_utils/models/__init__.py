"""The networks and how they load: diffusion pipelines, LoRA files, restyling, stand-ins, the
published configs, the classifier, the style encoder, LoRA training and image-set metrics."""
