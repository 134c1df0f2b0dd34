"""PEFT tuners of lamda_peft: one folder per method, in PEFT's config/layer/model layout."""
