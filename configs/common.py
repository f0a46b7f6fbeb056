"""Old path of the experiment schema, kept for one release (README documented `configs/common.py`): it now
lives in the package, `geoalign_jax.train.experiment`."""
from geoalign_jax.train.experiment import (  # noqa: F401
    changed_fields, check_config, flat_fields, get_config, model_config,
)
