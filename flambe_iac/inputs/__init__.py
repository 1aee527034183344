"""Every input: stack outputs, cluster files, the pulumi CLI, runnable files, secrets, extensions, trees, names."""
