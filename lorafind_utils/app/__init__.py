"""What users touch: the ``lorafind`` command line and the JupyterLab widget."""
