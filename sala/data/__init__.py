"""Training data: offline corpus, tokenizers, packed memory-mapped token files and batching."""
from sala.data.batching import IGNORE_INDEX, collate_windows, positions_from_starts
from sala.data.corpus import iter_source_documents, iter_stdlib_documents, stdlib_corpus_files
from sala.data.packed import PackedDataset, PackedTokens, PackedWriter, Window, read_meta, window_starts
from sala.data.prepare import SyntheticMix, prepare
from sala.modeling.tokenizer import TextTokenizer, load_tokenizer, shipped_tokenizer_path, train_bpe

__all__ = [
    "IGNORE_INDEX", "collate_windows", "positions_from_starts", "iter_source_documents", "iter_stdlib_documents",
    "stdlib_corpus_files", "PackedDataset", "PackedTokens", "PackedWriter", "Window", "read_meta",
    "window_starts", "SyntheticMix", "prepare", "TextTokenizer", "load_tokenizer", "shipped_tokenizer_path",
    "train_bpe",
]
