"""How good the detections are, and which of them to report.

``froc``             matching with the paper's 1-mm rule, FROC, R@k, the DoG baseline,
                     plots and tables
``operating_point``  :class:`~cascade.evaluation.operating_point.OperatingPoint` and its
                     calibration for a target number of false positives per image
"""
