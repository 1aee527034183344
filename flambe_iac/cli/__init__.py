"""Command lines: flambe-deploy's one argparse tree (deploy, check, day two), flambe-run and flambe-lab."""
