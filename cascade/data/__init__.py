"""Images and annotations in: DICOM → pixels, preprocessing, manifests, training patches.

``io``          a DICOM mammogram → float pixels, spacing, header facts (any transfer syntax)
``preprocess``  [0, 1] scaling, resampling to the 70-µm work grid, breast mask, the
                inverse :class:`~cascade.data.preprocess.GridTransform`
``manifest``    the dataset manifest (JSON Lines, ``docs/dataset-format.md``)
``inbreast``    INbreast OsiriX XML → manifest
``datasets``    training images in the work grid, masks, patch sampling, augmentation
"""
