"""Deterministic SYNTHETIC demo data in the Kaggle train.csv / test.csv layout.

Nothing here is real human preference data. Each row pairs a good answer with a bad one (a wrong sum, a wrong
capital, a refusal of a harmless request) so that a language model can learn the signal; ties pair two equally
good or two equally bad answers. Some prompts repeat with different pairs (so folds must group by prompt) and a
few rows are multi-turn.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from pipeline import artifacts

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("India", "New Delhi"), ("Cuba", "Havana"),
            ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Thailand", "Bangkok")]
TASKS = [("boil an egg", ["Place the egg in boiling water.", "Cook it for 9 minutes.", "Cool it in cold water."]),
         ("make tea", ["Boil water.", "Steep the tea bag for 3 minutes.", "Add milk or lemon if you like."]),
         ("plant a tree", ["Dig a hole twice as wide as the roots.", "Set the tree in and fill with soil.",
                           "Water it deeply."]),
         ("tie a tie", ["Drape the tie around your neck.", "Cross the wide end over and loop it up.",
                        "Pull it through the knot and tighten."]),
         ("write a cover letter", ["Address the hiring manager.", "Explain why you fit the role.",
                                   "Close with a call to action."]),
         ("clean a cast iron pan", ["Rinse it with hot water.", "Scrub with salt.", "Dry it and oil it lightly."])]
REFUSALS = ["I'm sorry, but I can't help with that.", "As an AI, I am unable to assist with this request.",
            "I cannot answer that question."]
MODELS = ["demo-model-1", "demo-model-2", "demo-model-3", "demo-model-4"]


def _arithmetic(rng: random.Random) -> tuple[str, str, str, str]:
    x, y = rng.randint(2, 60), rng.randint(2, 60)
    wrong = x + y + rng.choice([-10, -3, -2, -1, 1, 2, 5, 10])
    good = rng.choice([f"{x} + {y} = {x + y}.", f"The answer is {x + y}."])
    bad = rng.choice([f"{x} + {y} = {wrong}.", f"The answer is {wrong}."])
    other_good = f"Adding them gives {x + y}."
    return f"What is {x} + {y}?", good, bad, other_good


def _capital(rng: random.Random) -> tuple[str, str, str, str]:
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    return (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
            f"The capital of {country} is {wrong}.", f"It is {city}.")


def _howto(rng: random.Random) -> tuple[str, str, str, str]:
    task, steps = rng.choice(TASKS)
    good = "Here is how:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    return f"How do I {task}?", good, rng.choice(REFUSALS), " ".join(steps)


def make_rows(n_rows: int, seed: int, with_labels: bool, id_offset: int = 0) -> pd.DataFrame:
    """`n_rows` synthetic rows; labels are roughly 40% a / 40% b / 20% tie."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        prompt, good, bad, other_good = rng.choice([_arithmetic, _capital, _howto])(rng)
        kind = rng.random()
        if kind < 0.2:
            # Tie: two good answers or two bad ones.
            a, b, label = (good, other_good, 2) if rng.random() < 0.5 else (bad, bad, 2)
        elif kind < 0.6:
            a, b, label = good, bad, 0
        else:
            a, b, label = bad, good, 1
        prompts, responses_a, responses_b = [prompt], [a], [b]
        if rng.random() < 0.1:
            follow_up = "Thanks! Can you say it again briefly?"
            prompts.append(follow_up)
            responses_a.append(a.splitlines()[-1])
            responses_b.append(b.splitlines()[-1])
        row = {"id": id_offset + i, "model_a": rng.choice(MODELS), "model_b": rng.choice(MODELS),
               "prompt": json.dumps(prompts), "response_a": json.dumps(responses_a),
               "response_b": json.dumps(responses_b)}
        if with_labels:
            row.update({"winner_model_a": int(label == 0), "winner_model_b": int(label == 1),
                        "winner_tie": int(label == 2)})
        else:
            del row["model_a"], row["model_b"]
        rows.append(row)
    return pd.DataFrame(rows)


def ensure_demo_files(folder: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """Write demo train.csv / test.csv into `folder` once (their name encodes size and seed) and return paths."""
    folder = Path(folder)
    train = folder / f"demo_train_n{n_train}_s{seed}.csv"
    test = folder / f"demo_test_n{n_test}_s{seed}.csv"
    for path, frame in ((train, lambda: make_rows(n_train, seed, True)),
                        (test, lambda: make_rows(n_test, seed + 1, False, id_offset=1_000_000))):
        # Every rank may write: the content is deterministic and the rename atomic.
        if not path.exists():
            with artifacts.atomic_path(path) as tmp:
                frame().to_csv(tmp, index=False)
    return train, test
