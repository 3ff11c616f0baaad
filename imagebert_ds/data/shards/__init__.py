"""WebDataset tar shards, by job: ``format`` (naming, keys, ``.json``/``.txt`` components),
``npy`` (the ``.npy`` codec), ``index`` (DALI index files), ``writer`` (atomic writing) and
``reader`` (memory-mapped and plain reading). The format is described in docs/data.md.

The names other packages use are re-exported here, so ``from imagebert_ds.data.shards import
ShardWriter`` keeps working; code inside ``data/`` imports from the submodules.
"""
from imagebert_ds.data.shards.format import (INDEX_VERSION, BadSampleError, image_id_of,
                                             index_path_for, list_shards, parse_meta,
                                             shard_name, split_captions, split_member_name,
                                             split_sample_key)
from imagebert_ds.data.shards.index import (IndexEntry, ensure_index, read_index,
                                            tar_ends_whole, write_index)
from imagebert_ds.data.shards.npy import (load_npy, npy_bytes, npy_column, npy_view,
                                          npy_views)
from imagebert_ds.data.shards.reader import NpyRef, ShardFiles, iter_samples
from imagebert_ds.data.shards.writer import ShardWriter

__all__ = ["INDEX_VERSION", "BadSampleError", "IndexEntry", "NpyRef", "ShardFiles",
           "ShardWriter", "ensure_index", "image_id_of", "index_path_for", "iter_samples",
           "list_shards", "load_npy", "npy_bytes", "npy_column", "npy_view", "npy_views",
           "parse_meta", "read_index", "shard_name", "split_captions", "split_member_name",
           "split_sample_key", "tar_ends_whole", "write_index"]
