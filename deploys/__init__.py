"""pyinfra deploys, one concern a file. Installed as flambe_iac.deploys."""
