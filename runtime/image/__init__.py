"""Images: the image model, NIfTI, DICOM in, DICOM-SEG out. The only place that imports nibabel/pydicom/highdicom."""
