"""Two-stage pairwise preference pipeline: LoRA-fine-tuned Llama classifier -> LightGBM stacker."""


def __getattr__(name: str):
    """`from pipeline import Predictor` without importing torch for every other use of the package."""
    if name == "Predictor":
        from pipeline.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
