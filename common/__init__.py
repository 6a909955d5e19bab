"""Code that curation, pipelines and training all use: validated YAML configs, loading pretrained models through
their real `from_pretrained` APIs, durable (power-loss safe) file writes and the library versions a run records.

`training/` imports nothing from `curation/` but the shard format, the contract between the two."""
