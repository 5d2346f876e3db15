"""LaFID-Bench: cases built from curated shards (identity-disjoint from training), videos generated
with a trained CoFE, and pose-stratified identity metrics (FaceSim-Arc, FaceSim-Cur, CLIPScore, FID,
face detection rate). See docs/bench.md."""
