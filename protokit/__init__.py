"""What the other packages share that is not the model's math: reading image files and
folders (DICOM among them), writing files atomically, devices and threads.

``protopnet`` computes; it reads no files and sets no threads.
"""
