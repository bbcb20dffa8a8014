"""Training: one Lightning module per task family, shared run-directory setup."""
