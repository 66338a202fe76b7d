"""Stage two's settings as one typed object: which members, how they pool and choose, and what `stack.vectors` asks
of the feature table, all checked once (every member's estimator built) before anything runs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from pipeline.errors import UserError, require_int, require_number
from pipeline.feature_table import BASE_PREFIX, LM_LAYER, ORIENTATIONS, VectorKey
from pipeline.stage_two import pooling
from pipeline.stage_two.features import VECTOR_BLOCKS
from pipeline.stage_two.groups import GROUPS
from pipeline.stage_two.members import Member, member_from_config

# The embed settings that make each optional input of a group (feature_table.produced_inputs).
INPUT_SETTINGS = {"vectors": "embed.layers", "likelihoods": "embed.lm_features=true",
                  "base_vectors": "embed.base_vectors=true",
                  "base_likelihoods": "embed.base_vectors=true and embed.lm_features=true"}
BASELINE_MEMBERS = ("length", "linear")  # baselines fitted as members; stack.baselines says which member each is


def available_layers(matrices: dict[str, np.ndarray], base: bool = False) -> list[str]:
    """The layers whose vectors a feature table holds (the base model's with `base`)."""
    keys = [VectorKey.parse(name) for name in matrices if VectorKey.is_vector(name)]
    return sorted({key.layer for key in keys if key.base == base and key.layer != LM_LAYER})


@dataclass(frozen=True)
class VectorRequest:
    """What `stack.vectors` asks of the embed features: whose vectors, which layers, blocks and orientations."""

    source: str                 # finetuned | base
    layers: list[str] | None    # None: every captured layer
    kinds: list[str]
    orientations: list[str]
    pca_components: int

    def settings(self, matrices: dict[str, np.ndarray]) -> dict:
        """The layers, blocks and orientations that feed the vector groups, checked against what embed made."""
        base = self.source == "base"
        present = available_layers(matrices, base)
        if not present:
            hint = "; run the embed stage with embed.base_vectors=true" if base else ""
            raise UserError(f"the embed features hold no {self.source} vectors{hint}")
        layers = present if self.layers is None else list(self.layers)
        missing = [layer for layer in layers if layer not in present]
        if missing:
            raise UserError(f"stack.vectors.layers={layers}: {missing} not in the embed features (have {present}); "
                            "re-run stage=embed with those embed.layers")
        prefix = BASE_PREFIX if base else ""
        swapped = str(VectorKey(layers[0], "verdict", "swp", base)) in matrices
        if "verdict_diff" in self.kinds and not swapped:
            raise UserError(f"stack.vectors.kinds={list(self.kinds)}: verdict_diff compares the verdict vectors of the "
                            "two A/B orientations, and these embed features have one (embed.swap_tta=false); drop "
                            "it (e.g. stack.vectors.kinds=[diff]) or re-run stage=embed with embed.swap_tta=true")
        return {"layers": layers, "kinds": list(self.kinds), "orientations": list(self.orientations),
                "prefix": prefix}


@dataclass
class StackSpec:
    """Stage two's settings as one typed object, built and checked once from `stack` (every member's estimator
    instantiated, so a bad `_target_` or grid fails at validation, before any model loads)."""

    seed: int
    inner_folds: int
    symmetric: bool
    select: bool
    select_z: float
    blend_l2: float
    pooling: pooling.PoolSettings    # how the members are combined (pipeline/pooling.py)
    calibrate: bool                  # a temperature per member, fitted on its inner OOF
    fallback_margin: float | None    # the best member replaces the blend where an inner split prefers it by more
    vectors: VectorRequest
    members: list[Member]            # blended, in stack.blend_members order
    baselines: dict[str, Member]     # length, linear: the members stack.baselines names

    def check_inputs(self, produced: set[str], produced_by: str) -> None:
        """Refuse a member whose groups read what the feature table will not hold (`produced`, from
        feature_table.produced_inputs), before any model loads. `produced_by` names the settings that decide it."""
        prefix = "base_" if self.vectors.source == "base" else ""
        for member in [*self.members, *self.baselines.values()]:
            for group in member.groups:
                needs = [prefix + r if r in ("vectors", "likelihoods") else r for r in GROUPS[group].reads]
                unmade = [need for need in needs if need not in produced]
                if unmade:
                    raise UserError(f"stack member {member.name} reads the `{group}` group "
                                    f"({unmade[0].replace('_', ' ')}), which {produced_by} does not make; set "
                                    f"{INPUT_SETTINGS[unmade[0]]} or drop {member.name} from stack.blend_members / "
                                    "stack.baselines")

    @classmethod
    def from_config(cls, stack: DictConfig, seed: int) -> "StackSpec":
        v = stack.vectors
        bad = [k for k in v.kinds if k not in VECTOR_BLOCKS]
        if bad:
            raise UserError(f"stack.vectors.kinds: unknown {bad}; choose from {', '.join(VECTOR_BLOCKS)}")
        bad = [o for o in v.orientations if o not in ORIENTATIONS]
        if bad or not v.orientations:
            raise UserError(f"stack.vectors.orientations={list(v.orientations)}: use fwd and/or swp")
        if v.source not in ("finetuned", "base"):
            raise UserError(f"stack.vectors.source={v.source}: use finetuned or base")
        vectors = VectorRequest(str(v.source), None if v.layers in (None, "all") else list(v.layers), list(v.kinds),
                                list(v.orientations), require_int(v.pca_components, "stack.vectors.pca_components", 0))
        if not stack.blend_members:
            raise UserError("stack.blend_members is empty: name at least one of stack.members")
        named = {"stack.blend_members": list(stack.blend_members),
                 "stack.baselines": [stack.baselines.get(k) for k in BASELINE_MEMBERS]}
        for key, names in named.items():
            missing = [n for n in names if n not in stack.members]
            if missing:
                raise UserError(f"{key} names {missing}, which stack.members does not define "
                                f"(have {', '.join(stack.members)}); stack.baselines needs "
                                f"{', '.join(BASELINE_MEMBERS)}")
        members = {n: member_from_config(n, stack.members[n]) for n in {*named["stack.blend_members"],
                                                                        *named["stack.baselines"]}}
        if stack.pooling not in pooling.POOLINGS:
            raise UserError(f"stack.pooling={stack.pooling}: use {' or '.join(pooling.POOLINGS)}")
        l2 = require_number(stack.blend_l2, "stack.blend_l2", 0.0)
        pool = pooling.PoolSettings(str(stack.pooling), l2, require_number(stack.blend_robust, "stack.blend_robust",
                                                                            0.0, 1.0 + 1e-12))
        if not isinstance(stack.calibrate, bool):
            raise UserError(f"stack.calibrate={stack.calibrate}: use true or false")
        margin = None if stack.fallback_margin is None else \
            require_number(stack.fallback_margin, "stack.fallback_margin", 0.0)
        return cls(int(require_int(seed, "seed", 0)), require_int(stack.inner_folds, "stack.inner_folds", 2),
                   bool(stack.symmetric), bool(stack.select), require_number(stack.select_z, "stack.select_z", 0.0),
                   l2, pool, stack.calibrate, margin, vectors,
                   [members[n] for n in stack.blend_members],
                   {k: members[stack.baselines[k]] for k in BASELINE_MEMBERS})
