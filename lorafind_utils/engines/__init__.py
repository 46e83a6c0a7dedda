"""Where jobs run: worker processes on this machine, a Ray cluster, papermill for notebooks."""
