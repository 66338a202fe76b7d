"""Two-stage pairwise preference pipeline: LoRA-fine-tuned Llama classifier -> LightGBM stacker."""
