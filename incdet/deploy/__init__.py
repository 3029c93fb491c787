"""Layer 6: detectors for applications: load_detector, Detector, export and inference."""
