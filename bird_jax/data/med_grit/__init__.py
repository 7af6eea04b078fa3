"""Med-GRIT TFDS dataset. Importing this package registers the builder under the name "med_grit"."""

from bird_jax.data.med_grit.med_grit_dataset_builder import Builder, MedGritConfig

__all__ = ["Builder", "MedGritConfig"]
