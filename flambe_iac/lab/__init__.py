"""The local lab: N real OpenSSH hosts on one machine, each in its own Linux namespaces."""
