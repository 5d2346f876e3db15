"""CoFE: collaborative face experts fusion on a Wan DiT, trained on lafid clip shards."""
