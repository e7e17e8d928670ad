"""Cloud runs: the AWS EMR launcher, its bootstrap script and its least-privilege IAM policies."""
