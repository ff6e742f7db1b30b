"""Raw scans to slice sets: image folders, NIfTI volumes and DICOM series, masks, phantoms, partitions,
domains."""
