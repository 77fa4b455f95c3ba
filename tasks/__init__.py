"""Built-in task plugins (installed as ``iclbench.tasks``), one module per family."""
