"""Built-in model plugins (installed as ``iclbench.models``)."""
