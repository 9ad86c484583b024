"""The training engine every stage shares (pretraining and fine-tuning): trainer, checkpoints,
preemption, metrics, schedules and the runner. Imports `pretrain.objectives` (the `Task`
interface) and below, never the entry points or `pretrain.interop`."""
