"""The paper's literal reading of the split, everything else as the embedded default.

    python -m merit_jax.main --config configs/paper_literal.py [--workdir DIR] [--config.KEY=VALUE ...]

The paper computes "the cosine-similarity matrix -> top-r eigenvectors -> token-weighted median split" on task
gradients taken "with stride-s subsampling". Read literally: PCA of the cosine matrix itself (its rows not
centred, so the first axis may be the component every task shares) and stride subsampling of the gradient
coordinates. Our default centres the rows and sketches the gradients (docs/SPLIT.md, docs/EXTRACT.md say why);
every run's report states the top-level agreement (ARI) between its split and this literal one computed from
the same gradients (partition.json: literal_agreement). To apply it to another config, set the same two keys:
`--config.split.center=False --config.extract.reduction=stride`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/paper_literal"
    c.split.center = False  # PCA of the cosine matrix itself
    c.extract.reduction = "stride"  # every s-th gradient coordinate (extract.stride = 7, the paper's s is unpublished)
    return c
