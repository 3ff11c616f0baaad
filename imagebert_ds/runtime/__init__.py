"""The process runtime: launch, distributed init, the orphan watchdog, the run lock, logging and
exit codes. Below ``train/`` and ``eval/``; knows nothing of models or data formats."""
