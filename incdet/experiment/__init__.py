"""Layer 5: experiments: methods, one step, protocols, importing and merging detectors, reports."""
