"""The command lines: flambe-deploy's one argparse tree (deploy, check and the day-two commands), flambe-run, flambe-lab."""
