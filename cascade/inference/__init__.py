"""The trained cascade applied to one image, in the received image's pixel grid.

``weights``    the checkpoints a detector runs: finding, hashing, identity, export,
               calibration and the stored operating point
``proposals``  the proposal network's map → thresholded components → candidates
``fpr``        crops around candidates, batched FPR scoring
``detector``   :class:`~cascade.inference.detector.Detector`: io → preprocess →
               proposals → FPR → operating point → detections
``preview``    PNG previews with circles

Never imports ``cascade.training``.
"""
