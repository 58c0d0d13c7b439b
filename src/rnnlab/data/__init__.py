"""Data: corpus registry and download, readers, pandera schemas, tokenizers, vocabularies, datasets."""
