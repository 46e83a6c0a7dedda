"""lorafind: rank the LoRA models that can paint in the style of an image, and reproduce the study."""
from lorafind_utils.core.config import load_catalog, load_profile, project_root, resolve, stage_params
from lorafind_utils.core.params import notebook_params

__version__ = "0.1.0"
__all__ = ["load_catalog", "load_profile", "notebook_params", "project_root", "resolve", "stage_params"]
