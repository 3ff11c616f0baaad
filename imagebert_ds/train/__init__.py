"""The trainer: run configs, the DeepSpeed engine, the multi-stage loop, stage hooks, metrics."""
