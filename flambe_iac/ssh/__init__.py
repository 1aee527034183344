"""The SSH policy (every ssh and rsync argv, paramiko's settings, ssh configs), the exec channel, host keys."""
