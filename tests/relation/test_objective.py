"""The ``cluster`` objective (``model/objectives/cluster.py``): its loss and its config, and the
``mcl`` alias of ``itc``."""
import pytest
import torch

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.model.objectives import parse_objectives
from imagebert_ds.testing import contract_batch


def _cfg(objectives: str) -> PretrainingConfig:
    return PretrainingConfig.from_yaml("tiny", [f"objectives={objectives}"])


def test_cluster_loss_is_class_weighted_cross_entropy():
    cfg = _cfg("{cluster: {k: 4}}")
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).eval()
    b = contract_batch(cfg, 6, generator=torch.Generator().manual_seed(0))
    b["cluster_labels"] = torch.tensor([0, 1, 2, 3, -100, 1])
    b["cluster_weights"] = torch.tensor([1.0, 2.0, 0.5, 1.0, 7.0, 2.0])
    out = model(**b, return_logits=True)
    ref = torch.nn.functional.cross_entropy(out["cluster_logits"][[0, 1, 2, 3, 5]],
                                            b["cluster_labels"][[0, 1, 2, 3, 5]],
                                            weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert float(out["loss/cluster"].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert "cluster_labels" in model.input_keys()
    del b["cluster_labels"]
    assert model(**b)["skipped"] == ("cluster",)


def test_mcl_is_itc():
    a = parse_objectives({"mcl": {"weight": 0.5, "embed_dim": 32}})
    assert list(a) == ["itc"] and a["itc"].embed_dim == 32 and a["itc"].weight == 0.5
    with pytest.raises(ConfigError, match="'mcl' is another name for 'itc'"):
        parse_objectives({"mcl": 1.0, "itc": 1.0})
    with pytest.raises(ConfigError, match="mcl.embed_dims"):
        parse_objectives({"mcl": {"embed_dims": 3}})


@pytest.mark.parametrize("options, key", [({"k": 1}, "k must be >= 2"),
                                          ({"recluster_every": 0}, "recluster_every"),
                                          ({"normalise": "l2"}, "cluster.normalise"),
                                          ({"normalize": "pca"}, "normalize")])
def test_cluster_config_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        parse_objectives({"cluster": options}, "stage s: objectives")


def test_run_config_errors_name_the_key(tmp_path):
    from imagebert_ds.train.config import load_run_config

    base = ["stages.0.sources.0.path=" + str(tmp_path), "stages.0.sources.1.path=" + str(tmp_path)]
    with pytest.raises(ConfigError, match="probe.test"):
        load_run_config("configs/runs/itr_toy.yaml", base + ["probe.test=null"], check_data=False)
    with pytest.raises(ConfigError, match="probe.train .* does not exist"):
        load_run_config("configs/runs/itr_toy.yaml",
                        base + [f"probe.train={tmp_path / 'nope'}", f"probe.test={tmp_path}"])
    with pytest.raises(ConfigError, match="cluster: sample_size"):
        load_run_config("configs/runs/itr_toy.yaml",
                        base + ["stages.0.objectives.cluster.sample_size=2"], check_data=False)
