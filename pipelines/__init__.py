"""Ray Data jobs composed from `curation/`: run with `ray job submit` on a cluster, or locally."""
