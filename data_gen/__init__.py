"""Med-GRIT-style data generation: segmentation sources -> boxes -> VG/RO/GC/MII records -> dataset folder.

  python -m data_gen --source phantom --out data/phantom            # built-in synthetic demo data
  python -m data_gen --source sam_med2d --root SAMed2Dv1 --out DIR  # SA-Med2D-20M or the SAM-Med2D demo
  python -m data_gen --source png_folder --root DIR --modalities ct --out DIR

Library: `data_gen.pipeline.generate_dataset(source, out_dir, ...)`; sources in `data_gen.sources`.
"""
