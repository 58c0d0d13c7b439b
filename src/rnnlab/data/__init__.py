"""Data: corpora (declared in params.yaml) and their download, readers, schemas, tokenizers, vocabularies."""
