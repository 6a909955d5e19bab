"""Data curation library: sources, filters, captioners, encoders, the shard writer and concept-density statistics."""
