"""ImageBERT model: config, encoder (``ImageBERTModel``) and the pre-training objectives.

    from imagebert_ds.model import ImageBERTConfig, ImageBERTModel, ImageBERTForPretraining
"""
from .config import ImageBERTConfig
from .modeling import ImageBERTModel, read_bert_state_dict
from .objectives import DEFAULT_OBJECTIVES, REGISTRY as OBJECTIVES, Objective, ObjectiveConfig
from .pretraining import MODEL_INPUT_KEYS, ImageBERTForPretraining

__all__ = ["ImageBERTConfig", "ImageBERTModel", "ImageBERTForPretraining", "MODEL_INPUT_KEYS",
           "read_bert_state_dict", "OBJECTIVES", "DEFAULT_OBJECTIVES", "Objective", "ObjectiveConfig"]
