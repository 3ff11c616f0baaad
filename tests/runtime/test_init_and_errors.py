"""The process runtime: the Slurm mapping of init, and the one table of exit codes."""
import pytest

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.runtime.distributed import prepare_env
from imagebert_ds.runtime.errors import TrainingError, run_command


def test_srun_variables_become_a_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    prepare_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")


def test_a_lone_process_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    prepare_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")
    assert int(os.environ["MASTER_PORT"]) > 0


def test_exit_codes(capsys):
    from imagebert_ds.data.shards import BadSampleError

    def fail(e):
        def body():
            raise e
        return body

    assert run_command(fail(ConfigError("x.yaml: bad key")), "pretrain") == 2
    assert capsys.readouterr().err == "config error: x.yaml: bad key\n"
    assert run_command(fail(TrainingError("stage s step 3")), "pretrain") == 1
    assert capsys.readouterr().err == "training stopped: stage s step 3\n"
    assert run_command(fail(BadSampleError("shard.tar: key k")), "pretrain") == 1
    assert capsys.readouterr().err.startswith("data error: ")
    assert run_command(fail(FileNotFoundError("no split")), "evaluate",
                       catch_value_errors=True) == 2
    assert capsys.readouterr().err == "evaluate: error: no split\n"
    with pytest.raises(ValueError):  # a plain ValueError in training is a bug: it surfaces
        run_command(fail(ValueError("bug")), "pretrain")
    assert run_command(lambda: 3, "x") == 3 and run_command(lambda: {"a": 1}, "x") == 0
