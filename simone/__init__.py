"""SIM-ONE MVLM: corpus → curation → tokenizer → shards → training → validation → package."""

__version__ = "0.1.0"
