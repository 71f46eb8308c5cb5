"""Datasets for fine-tuning: catalogue, local files, validation, chat tokenization, batching.

    from deltatune.data import load_rows, train_val_split, encode_rows, collate, pad_token_id

    rows, report = load_rows("chatterbot-en")           # validated canonical rows + report
    train, val = train_val_split(rows, 200, seed=0)    # deterministic
    examples, enc_report = encode_rows(tokenizer, train, max_length=96)
    batch = collate(examples[:8], pad_token_id(tokenizer))

Everything raises DataError (a ValueError) with the source, the reason counts and the fix.
"""

from deltatune.data.batching import collate, pack, pad_token_id
from deltatune.data.catalog import DatasetSpec, get_dataset_spec, list_datasets
from deltatune.data.formats import FORMATS, convert
from deltatune.data.loading import load_rows, parse_spec, train_val_split
from deltatune.data.report import DataError, DataReport, RowError
from deltatune.data.tokenization import IGNORE_INDEX, encode_chat, encode_classification, encode_rows

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "DataReport",
    "DatasetSpec",
    "RowError",
    "collate",
    "convert",
    "encode_chat",
    "encode_classification",
    "encode_rows",
    "get_dataset_spec",
    "list_datasets",
    "load_rows",
    "pack",
    "pad_token_id",
    "parse_spec",
    "train_val_split",
]
