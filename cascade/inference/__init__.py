"""The trained cascade applied to one image, in the received image's pixel grid.

``weights``    the checkpoints a detector runs: finding, hashing, identity, export,
               calibration and the stored operating point
``runtime``    where the networks run: torch, or ONNX Runtime on the CPU
``proposals``  the proposal network's map over breast-following windows →
               thresholded components → candidates (per-component windows)
``fpr``        crops around candidates, batched FPR scoring
``reference``  the previous implementation, kept as the parity reference
``detector``   :class:`~cascade.inference.detector.Detector`: io → preprocess →
               proposals → FPR → operating point → detections
``preview``    PNG previews with circles

Never imports ``cascade.training``.
"""
