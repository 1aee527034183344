"""Day two on a deployed cluster, one module a command (ssh-config, exec, download, status), over `access`."""
