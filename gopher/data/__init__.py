"""The data path: text sources, the SentencePiece tokenizer, and packing into windows."""

from gopher.data.packing import Packer, TokenDataset, pack_documents
from gopher.data.sources import (
    Document,
    select_split,
    stdlib_documents,
    text_files,
    unigram_bits_per_byte,
)
from gopher.data.tokenizer import Tokenizer

__all__ = [
    "Document",
    "Packer",
    "TokenDataset",
    "Tokenizer",
    "pack_documents",
    "select_split",
    "stdlib_documents",
    "text_files",
    "unigram_bits_per_byte",
]
