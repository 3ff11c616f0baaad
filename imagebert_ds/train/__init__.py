"""The trainer side: run configs, the DeepSpeed trainer, checkpoints, metrics, launchers, demo."""
