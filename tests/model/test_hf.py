"""Loading a real BERT (MiniLM-L6, 6 x 384) reproduces transformers' BertModel on text-only input."""
import pytest
import torch

from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining, ImageBERTModel

transformers = pytest.importorskip("transformers")

SENTENCES = ["a man riding a wave on top of a surfboard.", "two dogs.", "hello"]


@pytest.fixture(scope="module")
def reference(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    hf = transformers.BertModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        out = hf(**enc)
    return enc, out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_matches_hf_bert(minilm_path, reference, impl):
    enc, ref, ref_pooled = reference
    model = ImageBERTModel.from_bert(minilm_path, attn_impl=impl).eval()
    assert enc["attention_mask"].min() == 0  # the batch has padding
    with torch.no_grad():
        h = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    real = enc["attention_mask"].bool()
    # fp32; outputs at padded query positions are unused and HF computes them with its own mask
    diff = (h[real] - ref[real]).abs().max().item()
    print(f"HF max abs diff ({impl}): {diff:.2e}")
    assert diff < 1e-5
    torch.testing.assert_close(model.pool(h), ref_pooled, rtol=0, atol=1e-5)


def test_from_bert_leaves_region_params_fresh(minilm_path):
    torch.manual_seed(0)
    model = ImageBERTModel.from_bert(minilm_path, max_regions=10)
    report = model.load_bert(minilm_path)
    assert all("region" in k for k in report["missing"]), report["missing"]
    assert "embeddings.region_feat_proj.weight" in report["missing"]
    assert len(report["loaded"]) == 103  # every BERT tensor (embeddings.position_ids is a buffer we lack)


def test_pretraining_from_bert(minilm_path, tmp_path):
    torch.manual_seed(0)
    m = ImageBERTForPretraining.from_bert(minilm_path, max_regions=10,
                                          objectives={"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0, "itc": 1.0})
    ref = ImageBERTModel.from_bert(minilm_path)
    for k, v in ref.state_dict().items():
        if "region" not in k:
            assert torch.equal(m.bert.state_dict()[k], v), k
    assert m.objectives["mlm"].head.decoder.weight is m.bert.embeddings.word_embeddings.weight
    # a full config must agree with the checkpoint's sizes
    with pytest.raises(ValueError, match="hidden_size"):
        ImageBERTForPretraining.from_bert(minilm_path, config=PretrainingConfig(num_layers=6))
