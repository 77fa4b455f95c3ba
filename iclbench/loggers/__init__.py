"""Built-in run loggers (MLflow, TensorBoard): lifecycle-hook plugins registered through the ``iclbench``
entry-point group exactly like a third party's, enabled per run (``--log mlflow``, ``log: [tensorboard]``),
each an optional extra whose library is imported only when a run enables it."""
