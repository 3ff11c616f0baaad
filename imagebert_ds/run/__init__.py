"""The run as an artifact: its directory layout and markers, what ``--checkpoint`` may name,
checkpoints (``CheckpointManager``, the one fp32 consolidation) and the record a run leaves
(``resolved_config.yaml``). Below ``train/`` and ``eval/``."""
