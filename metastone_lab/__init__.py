"""metastone-lab: a workbench for reflective generative models (MetaStone-S1).

One causal-LM backbone is both the policy and a self-supervised process reward
model (SPRM). Submodules are imported lazily so ``import metastone_lab`` stays
cheap; import what you need, e.g. ``from metastone_lab.steps import step_mask``.
"""

__version__ = "0.1.0"
