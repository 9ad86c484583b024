"""Submitting every stage to SLURM (submitit), with requeue on preemption."""
