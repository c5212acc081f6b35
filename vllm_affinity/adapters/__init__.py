"""One file per architecture: a processor that fixes the pooled placeholder count and
a model subclass that pools the embeddings to exactly that count."""
