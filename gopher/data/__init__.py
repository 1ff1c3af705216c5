"""The data path: sources, filters, the SentencePiece tokenizer, mixing and packing."""

from gopher.data.filters import filter_documents
from gopher.data.mixture import Mixture
from gopher.data.packing import TokenDataset
from gopher.data.proportions import MIXTURES
from gopher.data.sources import (
    Document,
    select_split,
    stdlib_documents,
    text_files,
    unigram_bits_per_byte,
)
from gopher.data.tokenizer import Tokenizer

__all__ = [
    "MIXTURES",
    "Document",
    "Mixture",
    "TokenDataset",
    "Tokenizer",
    "filter_documents",
    "select_split",
    "stdlib_documents",
    "text_files",
    "unigram_bits_per_byte",
]
